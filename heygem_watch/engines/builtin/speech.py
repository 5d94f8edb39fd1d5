"""Speech analysis for the built-in engine: a recording's audio -> the mouth it needs, 100 times a second.

analyse_speech(track) reads the 16 kHz track in overlapping windows (never the whole signal), computes a few
acoustic features per 10 ms frame, and turns them into language-independent mouth targets:
  open     0 = lips shut .. 1 = this speaker's wide-open speech mouth. Loudness above 1 kHz (what the open mouth
           radiates; nasal murmur and the voicing bar below it leak out with the lips shut) relative to the speaker's
           own level, so it follows syllables in any language.
  width    -1 rounded (o/u/w) .. +1 spread (i/e): the second-formant region's centroid relative to the speaker's.
  closure  0..1 evidence of lips pressed together (m/b/p): a short dip inside speech with only low-band energy left.
  speech   voice activity; the mouth is shut outside it.
The curves are smoothed like a real mouth moves (no jitter), centred on the sound: against real speakers' lips
(bench/speech_eval.py) any lead or lag of the curve lowered the lag-0 correlation. Per-frame arrays are all that is held for the whole recording
(a 2-hour recording: 720k frames, a few MB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RATE = 100  # curve frames per second
SAMPLE_RATE = 16000  # Hz, what audio.AudioTrack holds
HOP = SAMPLE_RATE // RATE  # 160 samples between frames
WIN = 512  # analysis window (32 ms), centred on the frame time
NFFT = 1024  # zero-padded so the autocorrelation (voicing) is not circular
CHUNK_S = 30.0  # seconds of audio analysed at a time
EPS_DB = -120.0  # level of digital silence
SILENCE_DB = -75.0  # dB; below this OPEN_BAND level nothing is speech, whatever the recording's own level

# Frequency bands (Hz)
LOW_BAND = (60.0, 300.0)  # voicing bar / nasal murmur
MID_BAND = (300.0, 3000.0)  # first and second formants (feature only: it opened the mouth for nasals, see docs)
OPEN_BAND = (1000.0, 8000.0)  # radiated through the open mouth; below 1 kHz nasal murmur and voicing leak out shut
HIGH_BAND = (4000.0, 8000.0)  # frication (s, sh, f): teeth close, not the jaw
F1_BAND = (250.0, 1000.0)
F2_BAND = (900.0, 3000.0)
PITCH_HZ = (70.0, 400.0)

# Level -> openness (on the OPEN_BAND level)
DYN_DB = 30.0  # dB below the speaker's loud-vowel level at which the mouth counts as shut
REF_PERCENTILE = 95.0  # the speaker's loud-vowel level: this percentile of the OPEN_BAND level
FLOOR_PERCENTILE = 10.0  # background-noise estimate (pauses)
FLOOR_MARGIN_DB = 6.0  # the mouth stays shut up to this far above the noise floor
REF_BLOCK_S = 10.0  # the reference level adapts over blocks of this length ...
REF_SPAN_BLOCKS = 3  # ... pooled over +-3 blocks (60 s), so a gain change mid-stream is followed
OPEN_GAMMA = 1.0  # shape of the level -> openness map

# Timing
LEAD_S = 0.0  # s the curves lead the sound; fitted -0.01..0.02 leave-one-clip-out, 0 wins (0.04 was 1-2 frames early)
SMOOTH_S = 0.05  # s, Gaussian sigma of the final curves; fitted 0.03..0.07 leave-one-clip-out (flat 0.05-0.07)
SPEECH_MIN_S = 0.05  # shorter voice-activity blips are noise
SPEECH_BRIDGE_S = 0.15  # shorter pauses inside speech keep `speech` True (the mouth still closes by level)
GATE_S = 0.05  # the mouth may stay open this long past the voice (and open this much before it)
SPEECH_FLOOR = 0.2  # openness kept inside speech between syllables (real jaws do not shut between every one)

# Closure detection
CLOSURE_DIP_DB = 12.0  # a closure is at least this far below the neighbouring vowels
CLOSURE_SPAN_S = 0.12  # ... that lie within this distance on both sides


@dataclass
class MouthCurve:
    """Mouth targets at `rate` frames per second; frame i describes time i / rate seconds."""

    rate: int
    open: np.ndarray  # float32 (n,) 0..1
    width: np.ndarray  # float32 (n,) -1..1
    closure: np.ndarray  # float32 (n,) 0..1
    speech: np.ndarray  # bool (n,)

    def __len__(self) -> int:
        return len(self.open)

    @property
    def duration(self) -> float:
        """Seconds covered (time of the last frame)."""
        return (len(self.open) - 1) / self.rate if len(self.open) else 0.0

    def sample(self, times_s: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(open, width, closure) float32 arrays at arbitrary times in seconds (linear interpolation; times
        outside the recording get the first/last frame's value)."""
        t = np.asarray(times_s, dtype=np.float64) * self.rate
        idx = np.arange(len(self.open), dtype=np.float64)
        if len(idx) == 0:
            z = np.zeros(t.shape, np.float32)
            return z, z.copy(), z.copy()
        return tuple(np.interp(t, idx, c).astype(np.float32) for c in (self.open, self.width, self.closure))

    def speech_at(self, times_s: Any) -> np.ndarray:
        """Voice activity (bool) at arbitrary times: nearest frame."""
        i = np.clip(np.rint(np.asarray(times_s, np.float64) * self.rate).astype(np.int64), 0, max(0, len(self) - 1))
        return self.speech[i] if len(self) else np.zeros(i.shape, bool)


def n_frames(n_samples: int) -> int:
    """Frames for a track of n_samples: frame i at sample i*HOP, the last one at or before the end."""
    return n_samples // HOP + 1


# --------------------------------------------------------------------------------------------------- features

_FREQS = np.fft.rfftfreq(NFFT, 1.0 / SAMPLE_RATE)
_WINDOW = np.hanning(WIN).astype(np.float32)
# Autocorrelation of the window itself: divides out the taper so voicing is a true normalised correlation.
_WIN_AC = np.fft.irfft(np.abs(np.fft.rfft(_WINDOW, NFFT)) ** 2, NFFT)[: NFFT // 2]
_LAG_LO, _LAG_HI = int(SAMPLE_RATE / PITCH_HZ[1]), int(SAMPLE_RATE / PITCH_HZ[0])


def _band(lo: float, hi: float) -> np.ndarray:
    return (_FREQS >= lo) & (_FREQS < hi)


_BANDS = {name: _band(*b) for name, b in (("low", LOW_BAND), ("mid", MID_BAND), ("high", HIGH_BAND),
                                            ("f1", F1_BAND), ("f2", F2_BAND), ("open", OPEN_BAND))}
FEATURES = ("e_tot", "e_low", "e_mid", "e_high", "e_open", "f1", "f2", "voicing")


def _db(power: np.ndarray) -> np.ndarray:
    return np.maximum(10.0 * np.log10(power + 1e-12), EPS_DB).astype(np.float32)


def _features_block(x: np.ndarray) -> dict[str, np.ndarray]:
    """Features of every frame whose window lies in x (x starts WIN/2 before the first frame's centre)."""
    n = (len(x) - WIN) // HOP + 1
    frames = np.lib.stride_tricks.as_strided(x, (n, WIN), (x.strides[0] * HOP, x.strides[0]), writeable=False)
    spec = np.fft.rfft(frames * _WINDOW, NFFT, axis=1)
    p = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    out = {"e_tot": _db(p.sum(1) / WIN)}
    for name in ("low", "mid", "high", "open"):
        out["e_" + name] = _db(p[:, _BANDS[name]].sum(1) / WIN)
    for name in ("f1", "f2"):
        m = _BANDS[name]
        pw = p[:, m]
        out[name] = ((pw @ _FREQS[m].astype(np.float32)) / (pw.sum(1) + 1e-12)).astype(np.float32)
    ac = np.fft.irfft(p, NFFT, axis=1)[:, : NFFT // 2]
    norm = ac[:, _LAG_LO:_LAG_HI] / (_WIN_AC[_LAG_LO:_LAG_HI] / _WIN_AC[0])
    out["voicing"] = np.clip(norm.max(1) / (ac[:, 0] + 1e-9), 0.0, 1.0).astype(np.float32)
    return out


def frame_features(track, chunk_s: float = CHUNK_S) -> dict[str, np.ndarray]:
    """Per-frame features (float32 (n,) each, see FEATURES) of a track, read chunk by chunk.

    Frame i's window is centred on sample i*HOP; windows reaching outside the signal see zeros, so the result does
    not depend on chunk_s."""
    n = n_frames(track.n_samples)
    step = max(1, int(chunk_s * RATE))
    out = {k: np.empty(n, np.float32) for k in FEATURES}
    for f0 in range(0, n, step):
        f1 = min(n, f0 + step)
        x = np.asarray(track.read(f0 * HOP - WIN // 2, (f1 - f0 - 1) * HOP + WIN), dtype=np.float32)
        block = _features_block(x)
        for k in FEATURES:
            out[k][f0:f1] = block[k]
    return out


# --------------------------------------------------------------------------------------------------- curves

def _runs_fill(mask: np.ndarray, value: bool, max_len: int) -> np.ndarray:
    """Flip runs of `value` no longer than max_len frames (that do not touch the ends) to `not value`."""
    m = mask.copy()
    if len(m) == 0:
        return m
    d = np.diff(np.concatenate([[not value], m == value, [not value]]).astype(np.int8))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    for s, e in zip(starts, ends):
        if e - s <= max_len and (value or (s > 0 and e < len(m))):
            m[s:e] = not value
    return m


def _local_reference(level: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Per-frame loud-vowel level: REF_PERCENTILE of `level` over active frames in a window of blocks."""
    n = len(level)
    blk = int(REF_BLOCK_S * RATE)
    nb = max(1, -(-n // blk))
    fallback = float(np.percentile(level[active], REF_PERCENTILE)) if active.any() else float(level.max(initial=EPS_DB))
    refs = np.empty(nb, np.float64)
    for b in range(nb):
        lo, hi = max(0, (b - REF_SPAN_BLOCKS) * blk), min(n, (b + REF_SPAN_BLOCKS + 1) * blk)
        sel = level[lo:hi][active[lo:hi]]
        refs[b] = np.percentile(sel, REF_PERCENTILE) if len(sel) >= RATE else fallback
    centres = (np.arange(nb) + 0.5) * blk
    return np.interp(np.arange(n), centres, refs).astype(np.float32)


def _shift(x: np.ndarray, frames: int) -> np.ndarray:
    """y[i] = x[i + frames] (edge values repeated): positive frames make the curve lead the sound."""
    if frames == 0 or len(x) == 0:
        return x
    idx = np.clip(np.arange(len(x)) + frames, 0, len(x) - 1)
    return x[idx]


def curves_from_features(f: dict[str, np.ndarray]) -> MouthCurve:
    """Mouth targets from frame_features(); everything here works on per-frame arrays only."""
    level, n = f["e_open"].astype(np.float32), len(f["e_open"])
    if n == 0:
        z = np.zeros(0, np.float32)
        return MouthCurve(RATE, z, z.copy(), z.copy(), np.zeros(0, bool))
    # Anything within 40 dB of the loudest part of the recording may be speech; digital silence never is.
    peak = float(np.percentile(level, 99.5))
    candidate = level > max(peak - 40.0, EPS_DB + 1.0)
    ref = _local_reference(level, candidate)
    floor = float(np.percentile(level, FLOOR_PERCENTILE))
    lo = np.maximum(ref - DYN_DB, floor + FLOOR_MARGIN_DB)
    lo = np.minimum(lo, ref - 6.0)  # a recording with no pauses: the floor estimate is speech itself
    lo = np.maximum(lo, SILENCE_DB)
    raw = np.clip((level - lo) / np.maximum(ref - lo, 6.0), 0.0, 1.0) ** OPEN_GAMMA

    speech = level > lo
    speech = _runs_fill(speech, True, int(SPEECH_MIN_S * RATE))
    speech = _runs_fill(speech, False, int(SPEECH_BRIDGE_S * RATE))

    lead = int(round(LEAD_S * RATE))
    sig = SMOOTH_S * RATE
    opn = _gaussian(_shift(np.maximum(raw, SPEECH_FLOOR * speech) * speech, lead), sig)
    # The wide smoothing must not hold the mouth open into a pause: gate with voice activity (lead included),
    # widened by GATE_S and softened over a few frames, so the lips shut within ~100 ms of the voice ending.
    gw = int(round(GATE_S * RATE))
    gate = _running_max(_shift(speech.astype(np.float32), lead), 2 * gw + 1)
    opn = opn * _gaussian(gate, gw / 2.0)

    # Width: second-formant centroid relative to this speaker's voiced frames.
    voiced = speech & (f["voicing"] > 0.5)
    f2 = f["f2"].astype(np.float64)
    if voiced.sum() >= 10:
        # centre and spread from the 20/80 percentiles: robust, and fair to a speaker with two vowel kinds
        q20, q80 = np.percentile(f2[voiced], (20.0, 80.0))
        med, spread = float(q20 + q80) / 2.0, max(float(q80 - q20) / 2.0, 100.0)
    else:
        med, spread = float(np.median(f2)), 300.0
    width = np.tanh((f2 - med) / spread) * np.clip(raw * 2.0, 0.0, 1.0) * speech
    width = _gaussian(_shift(width, lead), 2.0 * sig)

    # Closure: a dip well below the vowels on both sides, inside speech.
    span = int(CLOSURE_SPAN_S * RATE)
    centred = _running_max(level, span)
    off = span // 2 + 1
    dip = np.minimum(_shift(centred, -off), _shift(centred, off)) - level
    inside = speech
    closure = np.clip((dip - CLOSURE_DIP_DB) / CLOSURE_DIP_DB, 0.0, 1.0) * inside
    closure = _gaussian(_shift(closure, lead), sig)

    return MouthCurve(RATE, np.clip(opn, 0, 1).astype(np.float32), np.clip(width, -1, 1).astype(np.float32),
                      np.clip(closure, 0, 1).astype(np.float32), speech.astype(bool))


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d(x, sigma, mode="nearest"): the same kernel (radius int(4 sigma + 0.5)) and
    edges, without importing scipy.ndimage, which a one-shot `heygem-watch process` paid 0.3 s for."""
    x = np.asarray(x, np.float64)
    r = int(4.0 * sigma + 0.5)
    if r < 1 or len(x) == 0:
        return x.copy()
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return np.convolve(np.pad(x, r, mode="edge"), k / k.sum(), mode="valid")


def _running_max(x: np.ndarray, size: int) -> np.ndarray:
    """scipy.ndimage.maximum_filter1d(x, size, mode="nearest"): window [i - size//2, i + (size-1)//2]."""
    x = np.asarray(x)
    if size <= 1 or len(x) == 0:
        return x.copy()
    padded = np.pad(x, (size // 2, (size - 1) // 2), mode="edge")
    return np.lib.stride_tricks.sliding_window_view(padded, size).max(-1)


def analyse_speech(track, chunk_s: float = CHUNK_S) -> MouthCurve:
    """AudioTrack (16 kHz mono float32) -> MouthCurve at RATE frames/s. Reads the track chunk by chunk."""
    if getattr(track, "sample_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"speech analysis needs {SAMPLE_RATE} Hz audio, got {track.sample_rate} Hz "
                         f"({getattr(track, 'path', 'track')})")
    return curves_from_features(frame_features(track, chunk_s))
