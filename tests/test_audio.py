"""audio.py: one streaming pass, 16 kHz mono on the recording's own timeline, plus an AAC copy for muxing."""

import av
import numpy as np
import pytest

from heygem_watch.audio import SAMPLE_RATE, AudioTrack, extract_audio
from heygem_watch.media import MediaError
from tests import mediagen


def _tone(seconds, freq=440.0, rate=SAMPLE_RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_wav_duration_and_content(tmp_path):
    x = _tone(2.0)
    src = mediagen.write_audio(tmp_path / "a.wav", x)
    tr = extract_audio(src, tmp_path / "w")
    assert tr.n_samples == len(x)
    y = tr.all()
    assert np.corrcoef(x[1000:-1000], y[1000:-1000])[0, 1] > 0.99
    assert tr.m4a_path.exists()
    with av.open(str(tr.m4a_path)) as c:
        assert abs(c.duration / 1e6 - 2.0) < 0.05


def test_resampled_from_44k_stereo_keeps_timing(tmp_path):
    rate = 44100
    t = np.arange(3 * rate) / rate
    x = np.where((t > 1.0) & (t < 1.5), np.sin(2 * np.pi * 300 * t), 0).astype(np.float32)
    path = tmp_path / "s.mkv"
    with av.open(str(path), "w") as out:
        st = out.add_stream("pcm_s16le", rate=rate, layout="stereo")
        for s in range(0, len(x), 1000):
            a = (np.stack([x[s:s + 1000]] * 2) * 20000).astype(np.int16)
            fr = av.AudioFrame.from_ndarray(a.T.reshape(1, -1).copy(), format="s16", layout="stereo")
            fr.sample_rate, fr.pts = rate, s
            for p in st.encode(fr):
                out.mux(p)
    tr = extract_audio(path, tmp_path / "w")
    y = np.abs(tr.all())
    on = np.flatnonzero(y > 0.05)
    assert abs(on[0] / SAMPLE_RATE - 1.0) < 0.005 and abs(on[-1] / SAMPLE_RATE - 1.5) < 0.005
    assert abs(tr.duration - 3.0) < 0.01


def test_flv_with_video_aligns_audio_to_the_container_timeline(tmp_path):
    # 0.5 s of silence then a burst: the burst must sit at 0.5 s on the output timeline
    x = np.zeros(int(2.0 * SAMPLE_RATE), np.float32)
    x[8000:12000] = _tone(0.25)
    frames = (np.full((64, 64, 3), i * 4, np.uint8) for i in range(50))
    rec = mediagen.write_video(tmp_path / "r.flv", frames, 25, audio=x)
    tr = extract_audio(rec, tmp_path / "w")
    on = np.flatnonzero(np.abs(tr.all()) > 0.05)
    assert abs(on[0] / SAMPLE_RATE - 0.5) < 0.01  # priming shifted in front of the video is dropped


def test_read_pads_outside_and_chunks_cover_everything(tmp_path):
    tr = AudioTrack.from_array(np.arange(1000, dtype=np.float32), tmp_path)
    assert tr.read(-5, 10)[:5].tolist() == [0] * 5 and tr.read(-5, 10)[5:].tolist() == [0, 1, 2, 3, 4]
    assert tr.read(995, 10)[5:].tolist() == [0] * 5
    chunks = list(tr.iter_chunks(seconds=300 / SAMPLE_RATE))
    assert [s for s, _ in chunks] == [0, 300, 600, 900]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), np.arange(1000, dtype=np.float32))


def test_reopen_finished_work_dir(tmp_path):
    src = mediagen.write_audio(tmp_path / "a.wav", _tone(1.0))
    tr = extract_audio(src, tmp_path / "w")
    again = AudioTrack.open(tmp_path / "w")
    assert again is not None and again.n_samples == tr.n_samples
    (tmp_path / "w" / "audio16k.f32").write_bytes(b"1234")  # damaged: not reused
    assert AudioTrack.open(tmp_path / "w") is None


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"hello, not a video\n" * 20, "not a readable")])
def test_bad_files_name_file_and_reason(tmp_path, content, reason):
    p = tmp_path / "bad name.flv"
    p.write_bytes(content)
    with pytest.raises(MediaError) as ei:
        extract_audio(p, tmp_path / "w")
    assert "bad name.flv" in str(ei.value) and reason in str(ei.value)


def test_video_without_audio_is_refused(tmp_path):
    rec = mediagen.write_video(tmp_path / "v.mp4", (np.zeros((32, 32, 3), np.uint8) for _ in range(5)), 25)
    with pytest.raises(MediaError, match="no audio track"):
        extract_audio(rec, tmp_path / "w")


def test_silent_audio_is_noted(tmp_path):
    src = mediagen.write_audio(tmp_path / "s.wav", np.zeros(SAMPLE_RATE, np.float32))
    tr = extract_audio(src, tmp_path / "w")
    assert any("silent" in n for n in tr.notes)


def test_truncated_flv_is_decoded_as_far_as_possible_and_noted(tmp_path):
    frames = (np.full((64, 64, 3), i % 200, np.uint8) for i in range(25 * 4))
    whole = mediagen.write_video(tmp_path / "whole.flv", frames, 25, _tone(4.0))
    data = whole.read_bytes()
    cut = tmp_path / "cut.flv"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # OBS killed mid-write: the file ends inside a tag
    full = extract_audio(whole, tmp_path / "w1")
    assert not any("truncated" in n for n in full.notes)
    part = extract_audio(cut, tmp_path / "w2")
    assert 0.5 < part.duration < full.duration - 0.5
    assert any("truncated" in n for n in part.notes), part.notes


def test_less_audio_than_the_container_states_is_noted(tmp_path):
    """completeness_notes: the container's duration as extract_audio read it (it has the file open), or probed."""
    from heygem_watch.audio import completeness_notes

    rec = mediagen.write_video(tmp_path / "r.mp4", (np.zeros((64, 64, 3), np.uint8) for _ in range(100)), 25,
                               _tone(4.0))
    assert not any("truncated" in n for n in extract_audio(rec, tmp_path / "w").notes)
    assert completeness_notes(rec, 4.0, 4.0) == [] and completeness_notes(rec, 4.0) == []
    given, probed = completeness_notes(rec, 1.0, 10.0), completeness_notes(rec, 1.0)
    assert len(given) == 1 and "header says 10.0 s" in given[0] and "1.0 s of audio" in given[0]
    assert len(probed) == 1 and "header says 4.0 s" in probed[0]


def _wav(path, samples, rate):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def test_truncated_wav_is_noted_like_flv(tmp_path):
    whole = _wav(tmp_path / "whole.wav", _tone(3.0), SAMPLE_RATE)
    data = whole.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: 44 + int(1.66 * SAMPLE_RATE) * 2])  # a full disk: the header still says 3.0 s
    assert not any("truncated" in n for n in extract_audio(whole, tmp_path / "w1").notes)
    part = extract_audio(cut, tmp_path / "w2")
    assert abs(part.duration - 1.66) < 0.01
    notes = [n for n in part.notes if "truncated" in n]
    assert notes and "3.0 s" in notes[0] and "1.7 s" in notes[0], part.notes


@pytest.mark.parametrize("rate", [1000, 8000, 44100])
def test_plain_wav_gets_no_spurious_gap_note(tmp_path, rate):
    src = _wav(tmp_path / f"tone{rate}.wav", _tone(3.0, freq=min(1000.0, rate / 4), rate=rate), rate)
    tr = extract_audio(src, tmp_path / "w")
    assert tr.notes == (), tr.notes
    assert abs(tr.duration - 3.0) < 0.01
