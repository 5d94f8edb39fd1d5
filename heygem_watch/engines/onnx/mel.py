"""The Wav2Lip mel spectrogram, computed in chunks so a 2-hour recording never holds its whole mel in memory.

Exactly the published recipe (16 kHz mono): pre-emphasis 0.97; STFT n_fft 800, hop 200, Hann window 800,
centred with *reflect* padding (what librosa.stft did by default when the weights were trained; librosa >= 0.10
defaults to zero padding, so it is passed explicitly); magnitude; 80 Slaney mel bands 55-7600 Hz;
dB = 20*log10(max(1e-5, mel)) - 20; clip(8*(dB+100)/100 - 4, -4, 4). 80 columns per second:
column t is centred on sample t*200 and there are 1 + n_samples // 200 of them.

    mel = MelSpectrogram(track)          # track: audio.AudioTrack (or anything with .n_samples and .read)
    mel.window(i, fps)                   # (80, 16) float32 for video frame i at fps (a Fraction is exact)
    mel.columns(a, b)                    # (80, b - a) float32, any range

Speech gate (MelSource, the engine's analyse_speech): columns the speech detector (vad.py) does
not call speech are given as digital silence, so music, game sound and applause draw the mouth the model draws in a
pause instead of mouthing along (HEYGEM_SPEECH_DETECTOR=false: the plain mel).
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np

from heygem_watch.audio import ArrayTrack

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS = 4.0  # symmetric normalisation range [-4, 4]
AMP_FLOOR = 1e-5
SILENT = -MAX_ABS  # every value of a column of digital silence: AMP_FLOOR is -120 dB, clipped to -4
COLUMNS_PER_SECOND = SAMPLE_RATE // HOP  # 80
WINDOW = 16  # columns per video frame (0.2 s)
CHUNK_COLUMNS = 80 * 20  # columns computed at once: 20 s of audio, ~0.5 MB of mel


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """(80, 401) float32 Slaney mel filter bank."""
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX).astype(np.float32)


@lru_cache(maxsize=1)
def hann() -> np.ndarray:
    """Periodic Hann window, the one librosa.stft uses (scipy get_window('hann', 800, fftbins=True))."""
    n = np.arange(WIN)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / WIN)).astype(np.float32)


def n_columns(n_samples: int) -> int:
    """Mel columns for a signal of n_samples (librosa's centred frame count)."""
    return 1 + n_samples // HOP


def window_start(i: int, fps, n_cols: int) -> int:
    """First mel column of video frame i at fps: int(i * 80 / fps); near the end, the last WINDOW columns.

    fps as a Fraction (template.fps) gives exact integer arithmetic (no 15.999 -> 15 float surprises)."""
    f = Fraction(fps)
    start = (i * COLUMNS_PER_SECOND * f.denominator) // f.numerator
    return max(0, min(start, n_cols - WINDOW))


def normalise(mag_mel: np.ndarray) -> np.ndarray:
    """Mel magnitudes -> the normalised dB values the weights were trained on, float32 in [-4, 4]."""
    db = 20.0 * np.log10(np.maximum(AMP_FLOOR, mag_mel)) - REF_LEVEL_DB
    return np.clip(2 * MAX_ABS * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS, -MAX_ABS, MAX_ABS).astype(np.float32)


def mel_of_array(samples: np.ndarray) -> np.ndarray:
    """(80, n_columns) for a whole in-memory signal (tests, short clips); same numbers as the chunked path."""
    return MelSpectrogram(ArrayTrack(samples)).columns(0, n_columns(len(samples)))


class MelSpectrogram:
    """Chunked Wav2Lip mel over a 16 kHz track; keeps one chunk of columns (CHUNK_COLUMNS) in memory."""

    def __init__(self, track, chunk_columns: int = CHUNK_COLUMNS, speech: np.ndarray | None = None):
        """speech: bool (n_cols,), False where a column is given as silence (SILENT); None: every column as it is."""
        sr = getattr(track, "sample_rate", SAMPLE_RATE)
        if sr != SAMPLE_RATE:
            raise ValueError(f"the Wav2Lip mel needs {SAMPLE_RATE} Hz audio, got {sr} Hz")
        self.track = track
        self.n_samples = int(track.n_samples)
        self.n_cols = n_columns(self.n_samples)
        if speech is not None and np.shape(speech) != (self.n_cols,):
            raise ValueError(f"speech mask of shape {np.shape(speech)} for {self.n_cols} mel columns")
        self.speech = speech
        self.chunk_columns = max(WINDOW, int(chunk_columns))
        self._lo, self._cache = 0, np.zeros((N_MELS, 0), np.float32)

    def window(self, i: int, fps) -> np.ndarray:
        """(80, 16) float32 mel window for video frame i at fps. Audio shorter than 16 columns repeats its edge."""
        if self.n_cols < WINDOW:
            cols = self.columns(0, self.n_cols)
            return np.pad(cols, ((0, 0), (0, WINDOW - self.n_cols)), mode="edge")
        s = window_start(i, fps, self.n_cols)
        if not (self._lo <= s and s + WINDOW <= self._lo + self._cache.shape[1]):
            # sequential access is the common case: compute the chunk that starts at this window
            hi = min(self.n_cols, s + self.chunk_columns)
            self._cache, self._lo = self.columns(s, hi), s
        return self._cache[:, s - self._lo: s - self._lo + WINDOW]

    def columns(self, a: int, b: int) -> np.ndarray:
        """(80, b - a) float32 normalised mel columns [a, b) (0 <= a <= b <= n_cols)."""
        a, b = max(0, int(a)), min(self.n_cols, int(b))
        if b <= a:
            return np.zeros((N_MELS, 0), np.float32)
        # padded-signal indices covered by these frames; the centred STFT pads n_fft/2 on each side
        k0, k1 = a * HOP - N_FFT // 2, (b - 1) * HOP + N_FFT // 2
        src = _reflect(np.arange(k0, k1), self.n_samples)
        lo, hi = int(src.min()), int(src.max()) + 1
        x = self.track.read(lo - 1, hi - lo + 1).astype(np.float32)  # one sample more: the pre-emphasis needs x[n-1]
        y = x[1:] - PREEMPHASIS * x[:-1]  # y[n] = x[n] - 0.97 x[n-1], with x[-1] = 0 (lfilter from rest)
        seg = y[src - lo]
        frames = np.lib.stride_tricks.sliding_window_view(seg, N_FFT)[::HOP]  # (b - a, 800)
        spec = np.abs(np.fft.rfft(frames * hann(), axis=1)).astype(np.float32)  # (b - a, 401)
        out = normalise(mel_basis() @ spec.T)
        if self.speech is not None:
            out[:, ~self.speech[a:b]] = SILENT
        return out


class MelSource:
    """What the engine's analyse_speech returns: the recording's track and its speech mask (or None); each render
    opens its own chunked mel cursor."""

    def __init__(self, track, speech: np.ndarray | None = None):
        self.track, self.speech = track, speech

    def cursor(self) -> MelSpectrogram:
        return MelSpectrogram(self.track, speech=self.speech)


def speech_columns(track, detector) -> np.ndarray:
    """bool (n_columns,): the columns within vad.PAD_S of what the detector (vad.SpeechDetector) calls speech."""
    from heygem_watch import vad

    return vad.speech_frames(track, n_columns(int(track.n_samples)), COLUMNS_PER_SECOND, detector)


def _reflect(k: np.ndarray, n: int) -> np.ndarray:
    """numpy 'reflect' padding as an index map: k in any range -> source index in [0, n)."""
    if n <= 1:
        return np.zeros_like(k)
    period = 2 * (n - 1)
    m = np.mod(k, period)
    return np.where(m < n, m, period - m)
