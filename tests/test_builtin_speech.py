"""engines/builtin/speech.py: audio -> mouth targets through the Whisper encoder and the shipped head, gated by voice
activity. Synthetic signals only (vowel-like harmonics, syllables, gaps); the encoder runs on a few seconds at a time.
These tests time the loudness gate and the head, so they analyse with the loudness gate alone (detector=False): the
speech detector hears the synthetic syllables as speech only some of the time, and it can only shut the mouth
further (its own tests, with spoken speech and music: test_builtin_vad.py)."""
import numpy as np
import pytest

from heygem_watch import audio
from heygem_watch.engines.builtin.speech import (RATE, SAMPLE_RATE, VAD_HOP, VAD_RATE, MouthCurve, analyse_speech,
                                                 curves_from_head, n_frames, open_band_level, voice_activity)
from tests.mediagen import silence, syllables, vowel

SR = SAMPLE_RATE


class ArrayTrack(audio.ArrayTrack):
    """audio.ArrayTrack that also counts the largest read."""

    max_read = 0

    def read(self, start, count):
        self.max_read = max(self.max_read, count)
        return super().read(start, count)


def _span(curve, t0, t1):
    return slice(int(t0 * curve.rate), int(t1 * curve.rate))


@pytest.fixture(scope="module")
def encoder():
    from heygem_watch.engines.builtin.whisper import load_encoder

    return load_encoder()


@pytest.fixture(scope="module")
def island(encoder):
    """3 s silence | 2 s syllables | 3 s silence, analysed once."""
    x = np.concatenate([silence(3.0), syllables(2.0), silence(3.0)])
    return analyse_speech(ArrayTrack(x), encoder=encoder, detector=False), len(x)


def test_digital_silence_is_shut_and_not_speech(encoder):
    c = analyse_speech(ArrayTrack(silence(3.0)), encoder=encoder, detector=False)
    assert isinstance(c, MouthCurve) and c.rate == RATE == 50
    assert len(c.open) == n_frames(3 * SR) == 150
    assert c.open.dtype == np.float32 and c.width.dtype == np.float32 and c.closure.dtype == np.float32
    assert c.speech.dtype == bool
    assert np.all(c.open < 1e-3) and not c.speech.any()
    assert np.all(np.abs(c.width) < 1e-3) and np.all(c.closure < 1e-3)


def test_speech_opens_the_mouth_and_silence_shuts_it(island):
    c, _ = island
    assert c.speech[_span(c, 3.1, 4.9)].mean() > 0.6  # the short pauses between syllables are not speech
    inside = c.open[_span(c, 3.0, 5.0)]
    assert inside.mean() > 0.2 and inside.max() > 0.6 and inside.std() > 0.1  # it moves with the syllables
    # shut before the voice and after it, bar the gate that lets the head lead its sound (<= ~0.35 s)
    assert c.open[_span(c, 0.0, 2.65)].max() < 0.02
    assert c.open[_span(c, 5.35, 8.0)].max() < 0.02
    assert not c.speech[_span(c, 0.0, 2.9)].any() and not c.speech[_span(c, 5.2, 8.0)].any()


def test_judge_silence_gap_keeps_the_mouth_shut(encoder):
    # the judge's test: speech 2 s | digital silence 2 s | speech 2 s; the gap must be <= 0.3 of speech
    x = np.concatenate([syllables(2.0), silence(2.0), syllables(2.0, seed=12)])
    c = analyse_speech(ArrayTrack(x), encoder=encoder, detector=False)
    t = np.arange(len(c.open)) / c.rate
    gap = c.open[(t > 2.2) & (t < 3.8)].mean()
    speech = c.open[(t < 1.8) | ((t > 4.2) & (t < 6.0))].mean()
    assert speech > 0.2 and gap <= 0.05 * speech


def test_short_pause_between_phrases_is_shut_and_the_mouth_leads_the_voice(encoder):
    """A 0.22 s silent pause between two phrases (as between Mandarin phrases): the mouth shuts inside it, yet it
    starts to open shortly (<= GATE_LEAD_S) before each phrase's voice. A symmetric 0.15 s gate kept it open."""
    a = np.concatenate([syllables(1.4), vowel(0.2, f0=150, seed=3)])  # ends on a vowel
    b = np.concatenate([vowel(0.2, f0=140, formants=(800, 1300), seed=4), syllables(1.4, seed=12)])
    x = np.concatenate([silence(1.0), a, silence(0.22), b, silence(1.0)])
    c = analyse_speech(ArrayTrack(x), encoder=encoder, detector=False)
    t = np.arange(len(c.open)) / c.rate
    g0 = 1.0 + len(a) / SR  # the pause: g0 .. g1
    g1 = g0 + 0.22
    assert not c.speech[(t > g0 + 0.03) & (t < g1 - 0.03)].any()
    assert c.open[(t > g0 + 0.055) & (t < g1 - 0.095)].max() < 0.01  # shut from ~50 ms after the voice
    assert c.open[(t > g1 - 0.1) & (t < g1)].max() > 0.2  # opening for the next phrase before it sounds
    assert c.open[(t > 0.9) & (t < 1.0)].max() > 0.05  # ... and for the first one
    assert c.open[t < 0.88].max() < 1e-3  # but not earlier than GATE_LEAD_S (+ the 32 ms loudness window)
    assert c.open[(t > 1.1) & (t < g0)].mean() > 0.2 and c.open[(t > g1) & (t < g1 + 1.5)].mean() > 0.2


def test_gate_is_asymmetric_around_voice_activity():
    """curves_from_head: the mouth may open up to GATE_LEAD_S before voice activity and is shut GATE_TRAIL_S after
    it; a 0.2 s pause in voice activity is shut in its middle."""
    from heygem_watch.engines.builtin.speech import GATE_LEAD_S, GATE_TRAIL_S

    assert GATE_TRAIL_S < GATE_LEAD_S
    n = 250
    t = np.arange(n) / RATE
    pred = np.stack([0.3 + 0.2 * np.cos(2 * np.pi * 4 * (t - 2.17))], 1).astype(np.float32)  # open at 2.17 s
    vad = np.zeros(n * 2, bool)
    vad[100:200] = True  # 1.0-1.99 s
    vad[220:400] = True  # 2.2-3.99 s: a 0.21 s pause at 1.99-2.2
    c = curves_from_head(pred, ("open",), vad)
    assert np.all(c.open[t < 1.0 - GATE_LEAD_S - 1e-9] == 0) and np.all(c.open[t > 3.99 + GATE_TRAIL_S + 1e-9] == 0)
    assert np.all(c.open[(t > 1.99 + GATE_TRAIL_S + 1e-9) & (t < 2.2 - GATE_LEAD_S - 1e-9)] == 0)
    lead = (t > 2.2 - GATE_LEAD_S + 0.045) & (t < 2.2)  # inside the lead margin, past its soft edge
    assert lead.any() and np.all(c.open[lead] > 0.05)
    assert np.all(c.open[(t > 3.99 + 0.035) & (t < 3.99 + 0.06)] < 0.1)  # closing within ~a frame or two


@pytest.mark.parametrize("fps", [22.131, 25.0, 29.97, 30.0, 60.0])
def test_frame_rates_see_the_speech_at_its_time(island, fps):
    """Sampled at any video frame rate, the mouth opens when the speech starts and shuts when it ends, and
    sample() at frame times equals the curve wherever a frame falls on the 50 Hz grid (no drift)."""
    c, n = island
    assert len(c) == n_frames(n) and abs(c.duration - (n / SR - 1.0 / RATE)) < 2.0 / RATE
    frames = np.arange(int(8.0 * fps))
    times = frames / fps
    opn = c.sample(times)[0]
    assert opn.shape == times.shape and opn.dtype == np.float32
    moving = times[opn > 0.05]
    assert 3.0 - 0.35 - 1.0 / fps <= moving.min() <= 3.0 + 0.3
    assert 5.0 - 0.3 <= moving.max() <= 5.0 + 0.35 + 1.0 / fps
    idx = np.rint(times * c.rate).astype(int)
    on_grid = (np.abs(times * c.rate - idx) < 1e-6) & (idx < len(c))
    np.testing.assert_allclose(opn[on_grid], c.open[idx[on_grid]], atol=1e-6)


def test_timing_holds_over_two_minutes(encoder):
    """A burst near the end of two minutes of silence is seen at its own time (streamed windows, no drift)."""
    x = np.zeros(120 * SR, np.float32)
    b = syllables(1.0)
    x[118 * SR:119 * SR] = b
    c = analyse_speech(ArrayTrack(x), encoder=encoder, detector=False)
    t = np.flatnonzero(c.open > 0.05) / c.rate
    assert len(t) and 118.0 - 0.35 <= t.min() <= 118.3 and 118.7 <= t.max() <= 119.35


def test_loudness_is_read_in_chunks_and_equals_the_whole(tmp_path):
    rng = np.random.default_rng(5)
    parts = []
    for k in range(12):
        parts += [vowel(rng.uniform(0.2, 0.6), f0=rng.uniform(90, 220), amp=rng.uniform(0.05, 0.3), seed=k),
                  silence(rng.uniform(0.05, 0.5))]
    x = np.concatenate(parts)
    whole = open_band_level(audio.AudioTrack.from_array(x, tmp_path), chunk_s=1000.0)
    small = ArrayTrack(x)
    chunked = open_band_level(small, chunk_s=0.37)
    assert small.max_read <= int(0.37 * VAD_RATE) * VAD_HOP + 1024  # never more than a chunk and its window
    np.testing.assert_allclose(whole, chunked, atol=1e-4)
    assert np.array_equal(voice_activity(whole), voice_activity(chunked))


def test_head_output_is_scaled_inside_speech_and_gated_outside():
    n = 500
    t = np.arange(n) / RATE
    pred = np.stack([0.3 + 0.2 * np.sin(2 * np.pi * 3 * t), 0.1 * np.cos(2 * np.pi * 2 * t)], 1).astype(np.float32)
    vad = np.zeros(n * 2, bool)
    vad[100:400] = True  # speech from 1 s to 4 s
    c = curves_from_head(pred, ("open", "width"), vad)
    s = _span(c, 1.2, 3.8)
    assert c.open[s].min() < 0.05 and c.open[s].max() > 0.95  # the head's 5/95 % inside speech span 0..1
    assert c.width[s].min() < -0.9 and c.width[s].max() > 0.9
    # shut outside speech, bar the gate's soft edges (~0.3 s)
    assert c.open[_span(c, 0.0, 0.6)].max() < 1e-2 and c.open[_span(c, 4.4, 10.0)].max() < 1e-2
    assert np.abs(c.width[_span(c, 4.4, 10.0)]).max() < 1e-2 and not c.closure.any()
    assert np.array_equal(c.speech, vad[::2])


def test_sample_interpolates_and_clamps():
    c = MouthCurve(100, np.array([0.0, 1.0, 0.0], np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
                   np.zeros(3, bool))
    o, w, cl = c.sample(np.array([-1.0, 0.005, 0.01, 0.015, 5.0]))
    np.testing.assert_allclose(o, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    assert o.dtype == np.float32 and w.shape == (5,) and cl.shape == (5,)


def test_wrong_sample_rate_is_a_clear_error():
    tr = ArrayTrack(silence(0.1))
    tr.sample_rate = 44100
    with pytest.raises(ValueError, match="16000"):
        analyse_speech(tr)


@pytest.mark.parametrize("n", [1, 2, 7, 500])
def test_filters_match_scipy_nearest_mode(n):
    from scipy.ndimage import gaussian_filter1d

    from heygem_watch.engines.builtin.speech import _gaussian

    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    x[n // 3:n // 2] = 5.0  # a plateau with steps
    for sigma in (0.4, 1.0, 2.5, 5.0, 10.0):
        np.testing.assert_allclose(_gaussian(x, sigma), gaussian_filter1d(x.astype(np.float64), sigma, mode="nearest"),
                                   atol=1e-9)
