"""hdr.py: the standards' anchor values (ITU-R BT.2100, BT.2087, BT.2408, SMPTE ST 2084) and HDR frames made SDR.
The HDR test videos come from tests/mediagen.py, which places SDR pictures in HDR from the same standards, written
the other way round."""
import av
import numpy as np
import pytest

from heygem_watch import hdr
from heygem_watch.media import iter_video_frames
from tests import mediagen


def test_primaries_matrix_is_bt2087s():
    to709 = hdr.bt2020_to_bt709()
    assert np.allclose(np.linalg.inv(to709), [[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114],
                                              [0.0164, 0.0880, 0.8956]], atol=1e-4)
    assert np.allclose(to709 @ np.ones(3), np.ones(3), atol=1e-6)  # D65 white stays white


def test_transfer_anchors():
    # HLG: 75 % signal is reference white, 203 cd/m2 on a 1000 cd/m2 display; 100 % the peak (grey: Ys = E)
    e = hdr.hlg_inverse_oetf(np.array([0.75, 1.0]))
    assert np.allclose(hdr.HLG_PEAK_NITS * e ** hdr.HLG_GAMMA, [203.0, 1000.0], rtol=2e-3)
    assert np.allclose(hdr.hlg_inverse_oetf(np.array([0.0, 0.5])), [0.0, 1 / 12])
    # PQ: 58 % is 203 cd/m2, 100 % 10000
    assert np.allclose(hdr.pq_eotf(np.array([0.0, 0.5806, 1.0])), [0.0, 203.0, 10000.0], rtol=3e-3)


def test_roll_off_keeps_what_is_under_the_knee_and_stays_under_white():
    x = np.linspace(0, 50, 5001)
    y = hdr.roll_off(x)
    assert np.array_equal(y[x <= hdr.KNEE], x[x <= hdr.KNEE])
    assert np.all(np.diff(y) >= 0) and y.max() <= 1.0
    k = hdr.KNEE
    assert abs((hdr.roll_off(np.array([k + 1e-6]))[0] - k) / 1e-6 - 1.0) < 1e-3  # no kink where the shoulder starts


@pytest.mark.parametrize("transfer", ["HLG", "PQ"])
def test_an_hdr_video_comes_out_as_the_sdr_picture_it_was_made_from(tmp_path, transfer):
    shown = list(mediagen.face_frames(2))
    p = mediagen.write_hdr_video(tmp_path / f"{transfer}.mp4", shown, transfer)
    with av.open(str(p)) as c:
        first = next(c.decode(video=0))
        assert hdr.transfer_of(first) == transfer
        as_stored = first.to_ndarray(format="bgr24").astype(int)
    got = next(iter(iter_video_frames(p))).astype(int)
    mid = shown[0].max(axis=2) < 200  # under the knee the picture is kept; above it highlights are rolled off
    assert np.abs(got - shown[0])[mid].mean() < 4
    # what the outputs looked like before: HLG washed out (colour spread between channels down by a quarter), PQ
    # dark and flat; the converted picture keeps the original's colour
    colour = [img.std(axis=2).mean() for img in (shown[0], got, as_stored)]
    assert abs(colour[1] / colour[0] - 1) < 0.05 and colour[2] / colour[0] < 0.8
    white = np.full((64, 64, 3), 255, np.uint8)
    w = next(iter(iter_video_frames(mediagen.write_hdr_video(tmp_path / "white.mp4", [white], transfer))))
    assert 235 <= w.mean() < 252  # reference white: just under SDR white


def test_sdr_ten_bit_is_left_alone(tmp_path):
    with av.open(str(tmp_path / "sdr10.mp4"), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p10le"
        vs.codec_context.color_trc = 1  # BT.709
        for _ in range(2):
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90, np.uint8), format="rgb24")
                                 .reformat(format="yuv420p10le")):
                out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)
    with av.open(str(tmp_path / "sdr10.mp4")) as c:
        assert hdr.transfer_of(next(c.decode(video=0))) is None
