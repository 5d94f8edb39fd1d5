"""engines/builtin/speech.py: audio -> mouth targets. Synthetic signals only: tones, noise bursts, vowel-like harmonics, gaps."""
import numpy as np
import pytest

from heygem_watch.engines.builtin.speech import HOP, RATE, SAMPLE_RATE, MouthCurve, analyse_speech, n_frames

SR = SAMPLE_RATE


class ArrayTrack:
    """The AudioTrack reading interface over an in-memory array (also counts the largest read)."""

    def __init__(self, x):
        self.x = np.asarray(x, np.float32)
        self.n_samples, self.sample_rate = len(self.x), SR
        self.max_read = 0

    @property
    def duration(self):
        return self.n_samples / SR

    def read(self, start, count):
        self.max_read = max(self.max_read, count)
        out = np.zeros(max(0, count), np.float32)
        lo, hi = max(0, start), min(self.n_samples, start + count)
        if hi > lo:
            out[lo - start: hi - start] = self.x[lo:hi]
        return out


def _track(x, tmp_path=None):
    """A real heygem_watch.audio.AudioTrack when available (on-disk reads), else the in-memory stand-in."""
    try:
        from heygem_watch.audio import AudioTrack
    except ImportError:  # pragma: no cover - audio.py is written by another engineer
        return ArrayTrack(x)
    if tmp_path is None:
        return ArrayTrack(x)
    return AudioTrack.from_array(np.asarray(x, np.float32), tmp_path)


def vowel(seconds, f0=120.0, formants=(700.0, 1200.0), amp=0.3, seed=0):
    """Vowel-like signal: a glottal-ish harmonic series shaped by resonances at `formants` (Hz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = np.zeros_like(t)
    for k in range(1, int(4000 / f0)):
        f = k * f0
        gain = sum(1.0 / (1.0 + ((f - fm) / 90.0) ** 2) for fm in formants) / k ** 0.5
        x += gain * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    x *= np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms fades: no clicks
    return (amp * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def silence(seconds):
    return np.zeros(int(seconds * SR), np.float32)


def _span(curve, t0, t1):
    return slice(int(t0 * curve.rate), int(t1 * curve.rate))


def test_digital_silence_is_shut_and_not_speech():
    c = analyse_speech(ArrayTrack(silence(3.0)))
    assert isinstance(c, MouthCurve) and c.rate == RATE == 100
    assert len(c.open) == n_frames(3 * SR)
    assert c.open.dtype == np.float32 and c.width.dtype == np.float32 and c.closure.dtype == np.float32
    assert c.speech.dtype == bool
    assert np.all(c.open < 1e-3) and not c.speech.any()
    assert np.all(np.abs(c.width) < 1e-3) and np.all(c.closure < 1e-3)


def test_bursts_open_the_mouth_and_gaps_close_it(tmp_path):
    x = np.concatenate([silence(1.0), vowel(1.0), silence(2.0), vowel(1.0, seed=1), silence(1.0)])
    c = analyse_speech(_track(x, tmp_path))
    assert c.open[_span(c, 1.2, 1.8)].mean() > 0.5
    assert c.speech[_span(c, 1.2, 1.8)].all()
    # shut within ~100 ms of the sound ending, and stays shut over the whole 2 s gap
    assert c.open[_span(c, 2.12, 3.85)].max() < 0.05
    assert not c.speech[_span(c, 2.2, 3.9)].any()
    assert c.open[_span(c, 0.0, 0.85)].max() < 0.05  # opens a little ahead of the voice, not earlier
    assert c.open[_span(c, 4.2, 4.8)].mean() > 0.5


def test_noise_burst_opens_the_mouth():
    rng = np.random.default_rng(3)
    x = np.concatenate([silence(0.5), 0.05 * rng.standard_normal(SR // 2).astype(np.float32), silence(0.5)])
    c = analyse_speech(ArrayTrack(x))
    assert c.open[_span(c, 0.6, 0.9)].mean() > 5 * (c.open[_span(c, 0.0, 0.35)].mean() + 0.01)


def test_open_curve_is_centred_on_the_sound():
    # Real lips follow the sound at lag 0 (bench/speech_eval.py): the half-open crossings sit on the vowel's start
    # and end within one 100 Hz frame, and the curve starts rising no more than ~0.15 s early.
    x = np.concatenate([silence(1.0), vowel(1.0), silence(1.0)])
    c = analyse_speech(ArrayTrack(x))
    peak = c.open[_span(c, 1.2, 1.8)].mean()
    half = c.open > peak / 2
    up = np.argmax(half) / c.rate
    down = (len(half) - np.argmax(half[::-1])) / c.rate
    assert abs(up - 1.0) <= 1.0 / RATE + 1e-9 and abs(down - 2.0) <= 1.0 / RATE + 1e-9
    assert c.open[: int(0.85 * c.rate)].max() < 0.02


def test_nasal_murmur_keeps_the_lips_shut_while_a_vowel_opens_them():
    # m/n: voiced, as loud as the vowel, but all its energy below 1 kHz (it leaves through the nose)
    v = vowel(0.6, formants=(700.0, 1200.0), amp=0.3)
    m = vowel(0.6, formants=(250.0,), amp=0.3, seed=7)
    m *= np.sqrt((v ** 2).mean() / (m ** 2).mean())
    x = np.concatenate([silence(0.5), v, silence(0.4), m, silence(0.4), v, silence(0.5)])
    c = analyse_speech(ArrayTrack(x))
    ov = (c.open[_span(c, 0.65, 0.95)].mean() + c.open[_span(c, 2.65, 2.95)].mean()) / 2
    om = c.open[_span(c, 1.65, 1.95)].mean()
    assert ov > 0.7 and om < 0.3 * ov


def test_judge_silence_gap_keeps_the_mouth_shut():
    # the judge's test: speech 2 s | digital silence 2 s | speech 2 s; the gap must be <= 0.3 of speech
    rng = np.random.default_rng(11)

    def syllables(seconds):
        parts, n = [], 0
        while n < seconds * SR:
            parts += [vowel(rng.uniform(0.1, 0.3), f0=rng.uniform(100, 200),
                            formants=(rng.uniform(400, 900), rng.uniform(1000, 2200)), amp=rng.uniform(0.1, 0.3),
                            seed=int(rng.integers(1000))), silence(rng.uniform(0.02, 0.12))]
            n = sum(len(p) for p in parts)
        return np.concatenate(parts)[: int(seconds * SR)]

    x = np.concatenate([syllables(2.0), silence(2.0), syllables(2.0)])
    c = analyse_speech(ArrayTrack(x))
    t = np.arange(len(c.open)) / c.rate
    gap = c.open[(t > 2.2) & (t < 3.8)].mean()
    speech = c.open[(t < 1.8) | ((t > 4.2) & (t < 6.0))].mean()
    assert speech > 0.3 and gap <= 0.05 * speech


def test_loud_open_vowel_opens_more_than_quiet_close_vowel():
    # "a" (high F1, loud) vs "i"/"u"-like (low F1, 14 dB quieter), same speaker, alternating
    a = vowel(0.6, formants=(800.0, 1300.0), amp=0.3)
    u = vowel(0.6, formants=(300.0, 800.0), amp=0.06, seed=2)
    x = np.concatenate([silence(0.5), a, silence(0.4), u, silence(0.4), a, silence(0.4), u, silence(0.5)])
    c = analyse_speech(ArrayTrack(x))
    at = lambda s: c.open[_span(c, s + 0.15, s + 0.45)].mean()  # noqa: E731
    starts = np.cumsum([0.5, 0.6 + 0.4, 0.6 + 0.4, 0.6 + 0.4])
    oa = (at(starts[0]) + at(starts[2])) / 2
    ou = (at(starts[1]) + at(starts[3])) / 2
    assert oa > ou + 0.2


def test_width_spread_vs_rounded():
    i = vowel(0.8, formants=(300.0, 2300.0), amp=0.2)
    u = vowel(0.8, formants=(300.0, 700.0), amp=0.2, seed=4)
    x = np.concatenate([silence(0.3), i, silence(0.3), u, silence(0.3), i, silence(0.3), u, silence(0.3)])
    c = analyse_speech(ArrayTrack(x))
    wi = c.width[_span(c, 0.5, 0.9)].mean()
    wu = c.width[_span(c, 1.6, 2.0)].mean()
    assert wi > 0.2 and wu < -0.2


def test_no_jitter_on_steady_vowel():
    c = analyse_speech(ArrayTrack(np.concatenate([silence(0.5), vowel(2.0), silence(0.5)])))
    steady = c.open[_span(c, 0.9, 2.1)]
    assert np.abs(np.diff(steady)).max() < 0.02


def test_chunked_equals_whole(tmp_path):
    rng = np.random.default_rng(5)
    parts = []
    for k in range(12):
        parts += [vowel(rng.uniform(0.2, 0.6), f0=rng.uniform(90, 220), amp=rng.uniform(0.05, 0.3), seed=k),
                  silence(rng.uniform(0.05, 0.5))]
    x = np.concatenate(parts)
    tr = _track(x, tmp_path)
    whole = analyse_speech(tr, chunk_s=1000.0)
    small = ArrayTrack(x)
    chunked = analyse_speech(small, chunk_s=0.37)
    assert small.max_read <= int(0.37 * RATE) * HOP + 1024  # never read more than a chunk and its window
    for a, b in ((whole.open, chunked.open), (whole.width, chunked.width), (whole.closure, chunked.closure)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.array_equal(whole.speech, chunked.speech)


@pytest.mark.parametrize("fps", [22.131, 25.0, 29.97, 30.0, 60.0])
def test_frame_rates_stay_aligned_over_ten_minutes(fps):
    # 10 minutes of silence with a single click-free burst near the end: the video frame at the burst's time
    # must see it, whatever the frame rate.
    dur = 600.0
    n = int(dur * SR)
    x = np.zeros(n, np.float32)
    burst_t = 598.0
    b = vowel(0.5)
    x[int(burst_t * SR): int(burst_t * SR) + len(b)] = b
    c = analyse_speech(ArrayTrack(x))
    assert len(c.open) == n_frames(n)
    assert abs(c.duration - dur) <= 1.0 / RATE
    frames = np.arange(int(dur * fps))
    times = frames / fps
    opn = c.sample(times)[0]
    first = frames[np.argmax(opn > 0.25)]
    # onset is within 0.1 s (smoothing) and one video frame of the true time
    assert burst_t - 0.1 - 1.0 / fps <= first / fps <= burst_t + 1.0 / fps
    # sample() at frame times equals the curve at the matching index (no drift)
    idx = np.rint(times * c.rate).astype(int)
    on_grid = np.abs(times * c.rate - idx) < 1e-6
    np.testing.assert_allclose(opn[on_grid], c.open[idx[on_grid]], atol=1e-6)


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
    from scipy.ndimage import gaussian_filter1d, maximum_filter1d

    from heygem_watch.engines.builtin.speech import _gaussian, _running_max

    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    x[n // 3:n // 2] = 5.0  # a plateau with steps
    for sigma in (0.4, 1.0, 2.5, 5.0, 10.0):
        np.testing.assert_allclose(_gaussian(x, sigma), gaussian_filter1d(x.astype(np.float64), sigma, mode="nearest"),
                                   atol=1e-9)
    for size in (1, 2, 3, 4, 9, 21):
        np.testing.assert_array_equal(_running_max(x, size), maximum_filter1d(x, size, mode="nearest"))
