"""vad.py: the speech detector read from the installed silero-vad wheel (hash-checked, no network),
streamed in blocks, and what it changes in the speech analysis: music keeps the mouth shut, speech still opens it.
Signals made here: chords over a drum pattern, synthetic syllables, speech spoken by espeak-ng (English, Mandarin)."""
import importlib.metadata
import shutil

import numpy as np
import pytest

from heygem_watch import audio
from heygem_watch import vad
from heygem_watch.engines.builtin.speech import GATE_LEAD_S, VAD_RATE, analyse_speech, speech_activity
from tests.mediagen import SR, music, silence, spoken, syllables


@pytest.fixture(scope="module")
def encoder():
    from heygem_watch.engines.builtin.whisper import load_encoder

    return load_encoder()


def test_the_model_comes_from_the_installed_wheel_and_is_verified():
    path = vad.model_path()
    assert path.is_file() and path.name == "silero_vad_16k_sequence.onnx"
    assert importlib.metadata.version(vad.DIST) == vad.VERSION
    import hashlib

    assert hashlib.sha256(vad.model_bytes()).hexdigest() == vad.MODEL_SHA256
    assert isinstance(vad.load_detector(), vad.SpeechDetector)


def test_a_damaged_model_is_refused_naming_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "silero_vad_16k_sequence.onnx"
    shutil.copyfile(vad.model_path(), bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(vad, "model_path", lambda: bad)
    with pytest.raises(vad.VadModelError) as e:
        vad.model_bytes()
    assert str(bad) in str(e.value) and "refusing to load" in str(e.value) and "setup.sh" in str(e.value)


def test_a_missing_or_other_version_of_the_package_is_named_with_the_fix(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(vad.VadModelError, match=r"silero-vad package .* not installed; run \./setup\.sh"):
        vad.model_path()

    class Other:
        version = "5.1.2"

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Other())
    with pytest.raises(vad.VadModelError, match=r"silero-vad 5\.1\.2 is installed, heygem-watch needs 6\.2\.3"):
        vad.model_path()


def test_blocks_give_the_one_pass_result():
    x = np.concatenate([silence(0.5), syllables(3.0), music(2.0), syllables(1.5, seed=3)])
    det = vad.load_detector()
    whole = det.probabilities(audio.ArrayTrack(x), block_frames=10_000)
    assert whole.shape == (len(x) // vad.FRAME,) and whole.dtype == np.float32
    for block in (1, 7, 64):
        np.testing.assert_allclose(det.probabilities(audio.ArrayTrack(x), block_frames=block), whole, atol=1e-5)


def test_speech_mask_hysteresis_and_padding():
    frame_s = vad.FRAME / vad.SAMPLE_RATE
    p = np.zeros(100, np.float32)
    p[20:30] = 0.9  # speech
    p[30:40] = 0.4  # under ON, over OFF: still speech (it started above ON)
    p[60:70] = 0.45  # never over ON: not speech
    m = vad.speech_mask(p, 400, VAD_RATE)
    t = np.arange(400) / VAD_RATE
    on_from, on_to = 20 * frame_s - vad.PAD_S, 40 * frame_s + vad.PAD_S
    inside = (t >= on_from + 0.011) & (t <= on_to - 0.011)
    outside = (t < on_from - 0.011) | (t > on_to + 0.011)
    assert m[inside].all() and not m[outside].any()
    assert not vad.speech_mask(np.zeros(50, np.float32), 200, VAD_RATE).any()


def test_hysteresis_matches_frame_by_frame_decisions():
    rng = np.random.default_rng(0)
    # values on both thresholds exactly, in the band between them, and runs that cross them
    p = np.concatenate([rng.choice([0.0, vad.OFF, 0.4, vad.ON, 0.9], 500), rng.uniform(0, 1, 500),
                        np.full(5, 0.4)]).astype(np.float32)
    want, state = [], False
    for x in p.tolist():
        state = x > vad.ON if not state else x >= vad.OFF
        want.append(state)
    np.testing.assert_array_equal(vad.hysteresis(p), np.array(want))
    assert not vad.hysteresis(np.full(10, 0.4, np.float32)).any()  # the band alone never starts speech
    assert vad.hysteresis(np.zeros(0, np.float32)).shape == (0,)


ENGLISH = "Good evening everyone, thank you for joining the stream tonight. Let us begin."
MANDARIN = "大家晚上好，欢迎来到今天的直播。我们现在开始。"


@pytest.mark.parametrize("voice, text", [("en", ENGLISH), ("cmn", MANDARIN)])
def test_spoken_speech_is_speech_from_its_first_word(voice, text):
    x = spoken(text, voice)
    p = vad.load_detector().probabilities(audio.ArrayTrack(x))
    loud = speech_activity(audio.ArrayTrack(x), detector=False)
    both = speech_activity(audio.ArrayTrack(x))
    assert (p > vad.ON).mean() > 0.7
    assert both.sum() >= 0.98 * loud.sum()  # nothing the loudness gate hears in it is taken away
    first = np.flatnonzero(loud)[0]
    assert both[first:first + 10].all()  # the first word's first 100 ms


def test_music_keeps_the_mouth_shut_and_speech_after_it_opens_it(encoder):
    """3 s of music, then spoken English, then 1 s of silence. Loudness alone opens the mouth to the music (the
    test's teeth); with the detector it stays shut until the voice, which still opens it."""
    sp = spoken(ENGLISH)
    x = np.concatenate([music(3.0), sp, silence(1.0)])
    end = 3.0 + len(sp) / SR
    p = vad.load_detector().probabilities(audio.ArrayTrack(x))
    assert (p[: int(2.8 * SR) // vad.FRAME] > vad.ON).mean() < 0.05
    loud_only = analyse_speech(audio.ArrayTrack(x), encoder=encoder, detector=False)
    gated = analyse_speech(audio.ArrayTrack(x), encoder=encoder)
    t = np.arange(len(gated.open)) / gated.rate
    # the voice starts at 3.0 s: loud frames within PAD_S of it count as speech, and the mouth may open GATE_LEAD_S
    # before those
    music_only = t < 3.0 - vad.PAD_S - GATE_LEAD_S - 0.04
    assert loud_only.open[music_only].max() > 0.3  # what the music did before
    assert gated.open[music_only].max() < 0.01 and not gated.speech[music_only].any()
    voiced = (t > 3.2) & (t < end - 0.2)
    assert gated.speech[voiced].mean() > 0.6 and gated.open[voiced].mean() > 0.2 and gated.open[voiced].std() > 0.1
    assert gated.open[t > end + 0.4].max() < 0.01


def test_speech_activity_is_loudness_and_detector_together():
    x = np.concatenate([music(2.0, seed=1), silence(0.5), syllables(2.0)])
    both = speech_activity(audio.ArrayTrack(x))
    loud = speech_activity(audio.ArrayTrack(x), detector=False)
    heard, near = vad.speech_decisions(audio.ArrayTrack(x), len(loud), VAD_RATE)
    assert both.shape == loud.shape == heard.shape == near.shape
    assert not (both & ~near).any()  # never away from speech the detector hears
    assert not (both & ~loud & ~heard).any()  # never where it is neither loud nor heard as speech
    t = np.arange(len(both)) / VAD_RATE
    assert loud[t < 2.0].mean() > 0.4 and not both[t < 2.0].any()


QUIET = "The quiet part of the show starts now, and it keeps going for a while."


def test_quiet_speech_the_detector_hears_moves_the_mouth_and_pauses_stay_shut(encoder):
    """A sentence 36 dB under the one before it: the loudness gate (30 dB under the loud level) shuts the mouth
    for all of it; where the detector hears it as speech, the mouth moves. The pause between the two stays shut."""
    loud_s, quiet_s = spoken(ENGLISH), spoken(QUIET) * 10 ** (-36 / 20)
    x = np.concatenate([silence(0.5), loud_s, silence(0.4), quiet_s, silence(0.5)])
    q0 = 0.5 + len(loud_s) / SR + 0.4
    track = audio.ArrayTrack(x)
    loud = speech_activity(track, detector=False)
    both = speech_activity(track)
    t = np.arange(len(both)) / VAD_RATE
    quiet = (t > q0 + 0.3) & (t < q0 + len(quiet_s) / SR - 0.3)
    pause = (t > q0 - 0.35) & (t < q0 - 0.05)
    assert loud[quiet].mean() < 0.1  # the test's teeth: loudness alone calls the quiet sentence a pause
    assert both[quiet].mean() > 0.5 and not both[pause].any() and not both[t < 0.3].any()
    gated = analyse_speech(track, encoder=encoder)
    loud_only = analyse_speech(track, encoder=encoder, detector=False)
    tc = np.arange(len(gated.open)) / gated.rate
    quiet_c = (tc > q0 + 0.3) & (tc < q0 + len(quiet_s) / SR - 0.3)
    assert loud_only.open[quiet_c].mean() < 0.02
    assert gated.open[quiet_c].mean() > 0.1 and gated.open[quiet_c].std() > 0.05
    assert gated.open[(tc > q0 - 0.3) & (tc < q0 - 0.15)].max() < 0.01  # the pause's middle: lips met


def test_at_rate_takes_the_32ms_frame_each_time_falls_in():
    dec = np.array([False, True, True, False, True])
    got = vad.at_rate(dec, 20, 100)  # 10 ms frames over 0.2 s; the decisions cover 0.16 s
    frame = np.floor(np.arange(20) / 100 * vad.SAMPLE_RATE / vad.FRAME).astype(int)
    want = np.array([dec[k] if k < len(dec) else False for k in frame])
    np.testing.assert_array_equal(got, want)
    assert got[4] and got[9] and not got[3] and not got[11] and got[13] and not got[19]
