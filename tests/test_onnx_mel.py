"""The chunked Wav2Lip mel against a direct librosa computation of the published recipe."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from heygem_watch.engines.onnx import mel
from heygem_watch.audio import ArrayTrack, AudioTrack


def reference_mel(x: np.ndarray) -> np.ndarray:
    """The recipe written out with librosa/scipy on the whole signal (reflect padding, as at training time)."""
    import librosa
    from scipy import signal

    y = signal.lfilter([1, -0.97], [1], x)
    d = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    s = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ np.abs(d)
    db = 20 * np.log10(np.maximum(1e-5, s)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def speechy(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    env = 0.5 * (1 + np.sin(2 * np.pi * 2.5 * t))
    x = env * (0.3 * np.sin(2 * np.pi * 180 * t) + 0.1 * np.sin(2 * np.pi * 1200 * t))
    return (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("n", [16000 * 3 + 123, 900])
def test_matches_the_published_recipe(n):
    x = speechy(n / 16000)[:n]
    ref = reference_mel(x)
    got = mel.mel_of_array(x)
    assert got.shape == ref.shape == (80, 1 + n // 200)
    assert np.abs(got - ref).max() < 1e-3
    assert got.min() >= -4 and got.max() <= 4 and got.std() > 0.5  # not a constant: the test means something


def test_chunks_give_the_same_columns_and_never_read_everything(tmp_path):
    x = speechy(6.0, seed=1)
    track = AudioTrack.from_array(x, tmp_path)
    reads = []
    orig = track.read

    def spy(start, count):
        reads.append(count)
        return orig(start, count)

    track.read = spy
    whole = mel.mel_of_array(x)
    spec = mel.MelSpectrogram(track, chunk_columns=40)  # 0.5 s of columns at a time
    fps = Fraction(25)
    n_frames = int(6.0 * 25)
    for i in range(n_frames):
        s = mel.window_start(i, fps, spec.n_cols)
        assert np.array_equal(spec.window(i, fps), spec.window(i, fps))
        assert np.abs(spec.window(i, fps) - whole[:, s:s + 16]).max() < 1e-5
    assert max(reads) <= 40 * 200 + 800 + 1  # one chunk plus the STFT context, never the whole track
    # random access (a seek backwards) still gives the right window
    assert np.abs(spec.window(3, fps) - whole[:, 9:25]).max() < 1e-5


def test_window_index_rule():
    n_cols = 1 + 16000 * 2 // 200  # 2 s -> 161 columns
    assert mel.window_start(5, Fraction(25), n_cols) == 16  # int(5 * 80 / 25), exact
    assert mel.window_start(7, Fraction(30000, 1001), n_cols) == 7 * 80 * 1001 // 30000
    assert mel.window_start(10_000, Fraction(25), n_cols) == n_cols - 16  # past the end: the last 16 columns
    starts = [mel.window_start(i, Fraction(30), n_cols) for i in range(60)]
    assert starts == sorted(starts) and starts[-1] == n_cols - 16


def test_short_audio_still_gives_a_full_window():
    x = speechy(0.05)  # 5 columns
    spec = mel.MelSpectrogram(ArrayTrack(x))
    w = spec.window(0, Fraction(25))
    assert w.shape == (80, 16) and np.array_equal(w[:, :spec.n_cols], mel.mel_of_array(x))


def test_silence_is_the_floor():
    assert np.allclose(mel.mel_of_array(np.zeros(8000, np.float32)), -4.0)


def test_wrong_rate_is_refused():
    class Track:
        sample_rate, n_samples = 44100, 100

    with pytest.raises(ValueError, match="16000"):
        mel.MelSpectrogram(Track())
