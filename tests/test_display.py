"""display.py: frames come out as players show them: upright whatever display matrix the file carries (a phone
stores a portrait video sideways; a matrix that is no quarter turn or mirror is left alone, with a note), HDR
(HLG, PQ) made SDR BT.709 (hdr.py)."""
import av
import numpy as np
import pytest

from heygem_watch.display import UPRIGHT, frame_orientation, upright
from heygem_watch.media import iter_video_frames
from tests import mediagen


def first_frame(path):
    with av.open(str(path)) as c:
        return next(c.decode(video=0))


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_turned_video_comes_out_upright(tmp_path, degrees):
    shown = mediagen.quadrants()
    stored = np.ascontiguousarray(np.rot90(shown, -degrees // 90))  # players turn it `degrees` counter-clockwise
    p = mediagen.write_video(tmp_path / "phone.mp4", [stored] * 3, 25, display=(degrees, False))
    o, note = frame_orientation(first_frame(p))
    assert o != UPRIGHT and note and f"{abs(degrees)}°" in note
    frames = list(iter_video_frames(p))
    assert len(frames) == 3 and frames[0].shape == shown.shape
    assert np.abs(frames[0].astype(int) - shown).mean() < 4
    raw = first_frame(p).to_ndarray(format="bgr24")  # as stored: not what players show, so the check above can fail
    assert raw.shape != shown.shape or np.abs(raw.astype(int) - shown).mean() > 20


def test_mirrored_video_comes_out_mirrored_back(tmp_path):
    shown = mediagen.quadrants()
    p = mediagen.write_video(tmp_path / "selfie.mp4", [np.ascontiguousarray(shown[:, ::-1])] * 2, 25,
                             display=(0, True))
    assert frame_orientation(first_frame(p))[0] == (False, False, True)
    assert np.abs(next(iter(iter_video_frames(p))).astype(int) - shown).mean() < 4


def test_turned_and_mirrored_video(tmp_path):
    stored = mediagen.quadrants()
    p = mediagen.write_video(tmp_path / "front camera.mp4", [stored] * 2, 25, display=(90, True))
    shown = np.fliplr(np.rot90(stored, 1))  # PyAV's set_display_rotation: the turn, then the mirror
    o, note = frame_orientation(first_frame(p))
    assert o == (True, True, True) and "turned 90° and mirrored" in note
    assert np.abs(next(iter(iter_video_frames(p))).astype(int) - shown).mean() < 4


def test_plain_video_and_free_angle(tmp_path):
    plain = mediagen.write_video(tmp_path / "plain.mp4", [mediagen.quadrants()] * 2, 25)
    assert frame_orientation(first_frame(plain)) == (UPRIGHT, None)
    tilted = mediagen.write_video(tmp_path / "tilted.mp4", [mediagen.quadrants()] * 2, 25, display=(30, False))
    o, note = frame_orientation(first_frame(tilted))
    assert o == UPRIGHT and "not a quarter turn" in note
    assert np.abs(next(iter(iter_video_frames(tilted))).astype(int) - mediagen.quadrants()).mean() < 4  # used as stored


def test_upright_matches_numpy_turns():
    img = mediagen.quadrants(6, 10)
    assert upright(img, UPRIGHT) is img
    assert np.array_equal(upright(img, (True, True, False)), np.rot90(img, 1))
    assert np.array_equal(upright(img, (True, False, True)), np.rot90(img, -1))
    assert np.array_equal(upright(img, (False, True, True)), np.rot90(img, 2))
    assert np.array_equal(upright(img[..., 0], (False, False, True)), img[:, ::-1, 0])



def test_the_colour_a_cache_stores_is_said_for_each_way_a_frame_is_made():
    from heygem_watch.display import BT601_MATRIX, Colour, Look, stored_colour

    def frame(w, h, fmt="yuv420p", tags=(1, 1, 1, 1)):
        f = av.VideoFrame(w, h, fmt)
        f.colorspace, f.color_primaries, f.color_trc, f.color_range = tags
        return f

    hlg = Look(transfer="HLG")
    assert stored_colour(frame(64, 48), Look()) == Colour(1, 1, 1, 1)  # its own tags
    assert stored_colour(frame(64, 48, tags=(1, 1, 1, 2)), Look()) == Colour(1, 1, 1, 1)  # made limited
    assert stored_colour(frame(64, 48, "yuvj420p", (1, 1, 1, 0)), Look()) == Colour(1, 1, 1, 1)
    assert stored_colour(frame(64, 47, tags=(1, 1, 1, 1)), Look()) == Colour(BT601_MATRIX, 1, 1, 1)  # odd: OpenCV
    assert stored_colour(frame(1920, 1080, "yuv420p10le", (9, 9, 18, 1)), hlg) == Colour(1, 1, 1, 1)  # SDR, HD
    assert stored_colour(frame(640, 480, "yuv420p10le", (9, 9, 18, 1)), hlg) == Colour(BT601_MATRIX, 1, 1, 1)
    assert stored_colour(frame(1919, 1080, "yuv420p10le", (9, 9, 18, 1)), hlg) == Colour(BT601_MATRIX, 1, 1, 1)
