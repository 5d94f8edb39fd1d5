"""Speech analysis for the built-in engine: a recording's audio -> the mouth it needs, FEATURE_RATE (50) times a second.

analyse_speech(track, head, encoder) streams the 16 kHz track twice, never holding it whole:
  1. Whisper encoder features (whisper.py, windows with overlap) -> the learned head (head.py): per 20 ms frame how
     open the mouth is and how wide, from what is being said (any language; fitted on real talking faces).
  2. Loudness per 10 ms (1-8 kHz level against the speaker's own level and the noise floor) -> voice activity:
     outside speech the mouth is shut, whatever the head says.
Outputs (MouthCurve, per frame):
  open     0 = lips shut .. 1 = this speaker's wide-open speech mouth: the head's output scaled so its 5th/95th
           percentiles inside speech map to 0/1, gated by voice activity.
  width    -1 narrow/rounded .. +1 spread, likewise scaled, 0 outside speech.
  closure  0 (kept for the renderer's interface: the head's openness already closes on m/b/p).
  speech   voice activity.
The head's context reaches 160 ms into the future, so the mouth leads its sound by what it learned from real faces.
Per-frame arrays are all that is held for the whole recording (a 2-hour recording: 360k frames, a few MB).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from heygem_watch import vad
from heygem_watch.engines.builtin import whisper

RATE = whisper.FEATURE_RATE  # curve frames per second (one per encoder frame)
SAMPLE_RATE = 16000  # Hz, what audio.AudioTrack holds
VAD_RATE = 100  # loudness frames per second
VAD_HOP = SAMPLE_RATE // VAD_RATE  # 160 samples
WIN = 512  # loudness window (32 ms), centred on the frame time
CHUNK_S = 30.0  # seconds of audio analysed for loudness at a time
EPS_DB = -120.0  # level of digital silence
SILENCE_DB = -75.0  # dB; below this OPEN_BAND level nothing is speech, whatever the recording's own level
OPEN_BAND = (1000.0, 8000.0)  # radiated through the open mouth; below 1 kHz nasal murmur and voicing leak out shut

# Voice activity from the OPEN_BAND level
DYN_DB = 30.0  # dB below the speaker's loud-vowel level at which the mouth counts as shut
REF_PERCENTILE = 95.0  # the speaker's loud-vowel level: this percentile of the level
FLOOR_PERCENTILE = 10.0  # background-noise estimate (pauses)
FLOOR_MARGIN_DB = 6.0  # speech is at least this far above the noise floor
REF_BLOCK_S = 10.0  # the reference level adapts over blocks of this length ...
REF_SPAN_BLOCKS = 3  # ... pooled over +-3 blocks (60 s), so a gain change mid-stream is followed
SPEECH_MIN_S = 0.05  # shorter voice-activity blips are noise
SPEECH_BRIDGE_S = 0.15  # shorter pauses inside speech keep `speech` True (the head closes the mouth in them)
# The gate around voice activity is asymmetric, as real mouths are: the lips part before the sound they make (the
# head leads its sound by ~1-3 frames) but close within a frame or two once the voice stops. A symmetric 0.15 s
# margin held the mouth open through every pause under ~0.3 s (Mandarin's pauses between phrases among them).
GATE_LEAD_S = 0.10  # the mouth may start to open this long before the voice ...
GATE_TRAIL_S = 0.05  # ... and is shut this long after it
GATE_RAMP_S = 0.04  # the gate's soft edge, inside those margins (0 exactly beyond them)

# Head output -> curves
SCALE_PERCENTILES = (5.0, 95.0)  # of the head's output inside speech, mapped to 0 and 1
MIN_SCALE_FRAMES = RATE  # with less speech than this (1 s), the head's own scale is used
SMOOTH_S = 0.02  # s, Gaussian sigma on the head's output


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
        n = len(self.open)
        if n == 0:
            z = np.zeros(t.shape, np.float32)
            return z, z.copy(), z.copy()
        # Only the frames the times fall between: np.interp converts all of xp and fp to float64 on every call,
        # and the renderer calls this once per output frame (a 2-hour curve: 2.5 ms a call, more than drawing the
        # frame). Outside [lo, hi - 1] are only times before the first / after the last frame, which get the same
        # edge values either way.
        lo, hi = 0, n
        if t.size and np.isfinite(t).all():
            lo = int(np.clip(np.floor(t.min()), 0, n - 1))
            hi = int(np.clip(np.ceil(t.max()), 0, n - 1)) + 1
        idx = np.arange(lo, hi, dtype=np.float64)
        return tuple(np.interp(t, idx, c[lo:hi]).astype(np.float32) for c in (self.open, self.width, self.closure))

    def speech_at(self, times_s: Any) -> np.ndarray:
        """Voice activity (bool) at arbitrary times: nearest frame."""
        i = np.clip(np.rint(np.asarray(times_s, np.float64) * self.rate).astype(np.int64), 0, max(0, len(self) - 1))
        return self.speech[i] if len(self) else np.zeros(i.shape, bool)


def n_frames(n_samples: int) -> int:
    """Curve frames for a track of n_samples (the encoder's frames, see whisper.n_features)."""
    return whisper.n_features(n_samples)


# --------------------------------------------------------------------------------------------------- loudness

_FREQS = np.fft.rfftfreq(WIN, 1.0 / SAMPLE_RATE)
_WINDOW = np.hanning(WIN).astype(np.float32)
_OPEN = (_FREQS >= OPEN_BAND[0]) & (_FREQS < OPEN_BAND[1])


def _level_block(x: np.ndarray) -> np.ndarray:
    """OPEN_BAND level (dB) of every frame whose window lies in x (x starts WIN/2 before the first frame)."""
    n = (len(x) - WIN) // VAD_HOP + 1
    frames = np.lib.stride_tricks.as_strided(x, (n, WIN), (x.strides[0] * VAD_HOP, x.strides[0]), writeable=False)
    spec = np.fft.rfft(frames * _WINDOW, axis=1)[:, _OPEN]
    p = (spec.real ** 2 + spec.imag ** 2).sum(1) / WIN
    return np.maximum(10.0 * np.log10(p + 1e-12), EPS_DB).astype(np.float32)


def open_band_level(track, chunk_s: float = CHUNK_S) -> np.ndarray:
    """(n,) float32 dB per 10 ms frame (frame i centred on sample i * VAD_HOP), read chunk by chunk; windows
    reaching outside the signal see zeros, so the result does not depend on chunk_s."""
    n = track.n_samples // VAD_HOP + 1
    step = max(1, int(chunk_s * VAD_RATE))
    out = np.empty(n, np.float32)
    for f0 in range(0, n, step):
        f1 = min(n, f0 + step)
        x = np.asarray(track.read(f0 * VAD_HOP - WIN // 2, (f1 - f0 - 1) * VAD_HOP + WIN), dtype=np.float32)
        out[f0:f1] = _level_block(x)
    return out


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
    blk = int(REF_BLOCK_S * VAD_RATE)
    nb = max(1, -(-n // blk))
    fallback = float(np.percentile(level[active], REF_PERCENTILE)) if active.any() else float(level.max(initial=EPS_DB))
    refs = np.empty(nb, np.float64)
    for b in range(nb):
        lo, hi = max(0, (b - REF_SPAN_BLOCKS) * blk), min(n, (b + REF_SPAN_BLOCKS + 1) * blk)
        sel = level[lo:hi][active[lo:hi]]
        refs[b] = np.percentile(sel, REF_PERCENTILE) if len(sel) >= VAD_RATE else fallback
    centres = (np.arange(nb) + 0.5) * blk
    return np.interp(np.arange(n), centres, refs).astype(np.float32)


def voice_activity(level: np.ndarray) -> np.ndarray:
    """bool (n,) per 10 ms frame from open_band_level(): within DYN_DB of the speaker's loud level (adapting over
    ~60 s), above the noise floor and SILENCE_DB; blips dropped, short pauses bridged."""
    n = len(level)
    if n == 0:
        return np.zeros(0, bool)
    # Anything within 40 dB of the loudest part of the recording may be speech; digital silence never is.
    peak = float(np.percentile(level, 99.5))
    candidate = level > max(peak - 40.0, EPS_DB + 1.0)
    ref = _local_reference(level, candidate)
    floor = float(np.percentile(level, FLOOR_PERCENTILE))
    lo = np.maximum(ref - DYN_DB, floor + FLOOR_MARGIN_DB)
    lo = np.minimum(lo, ref - 6.0)  # a recording with no pauses: the floor estimate is speech itself
    lo = np.maximum(lo, SILENCE_DB)
    speech = level > lo
    speech = _runs_fill(speech, True, int(SPEECH_MIN_S * VAD_RATE))
    return _runs_fill(speech, False, int(SPEECH_BRIDGE_S * VAD_RATE))


# --------------------------------------------------------------------------------------------------- curves

def _scaled(y: np.ndarray, speech: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    """y mapped so its SCALE_PERCENTILES inside speech land on lo_hi (the head's own scale with too little speech)."""
    if speech.sum() < MIN_SCALE_FRAMES:
        return y.astype(np.float64)
    p_lo, p_hi = np.percentile(y[speech], SCALE_PERCENTILES)
    return lo_hi[0] + (y - p_lo) / max(float(p_hi - p_lo), 1e-6) * (lo_hi[1] - lo_hi[0])


def curves_from_head(pred: np.ndarray, targets: tuple[str, ...], speech_vad: np.ndarray) -> MouthCurve:
    """MouthCurve from the head's per-frame output (n, T) and voice activity at VAD_RATE."""
    n = len(pred)
    if n == 0:
        z = np.zeros(0, np.float32)
        return MouthCurve(RATE, z, z.copy(), z.copy(), np.zeros(0, bool))
    step = VAD_RATE // RATE
    speech = np.zeros(n, bool)
    sv = speech_vad[::step][:n]
    speech[:len(sv)] = sv
    sig = SMOOTH_S * RATE
    opn = _scaled(_gaussian(pred[:, targets.index("open")], sig), speech, (0.0, 1.0))
    gate = _speech_gate(speech_vad, n)
    opn = np.clip(opn, 0.0, 1.0) * gate
    if "width" in targets:
        width = np.clip(_scaled(_gaussian(pred[:, targets.index("width")], sig), speech, (-1.0, 1.0)), -1, 1) * gate
    else:
        width = np.zeros(n)
    return MouthCurve(RATE, opn.astype(np.float32), width.astype(np.float32), np.zeros(n, np.float32), speech)


def _speech_gate(speech_vad: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64 0..1 at RATE from voice activity at VAD_RATE: 1 in speech and up to GATE_LEAD_S - GATE_RAMP_S
    before it / GATE_TRAIL_S - GATE_RAMP_S after it, falling smoothly to exactly 0 at GATE_LEAD_S / GATE_TRAIL_S."""
    t = np.arange(n) / RATE
    vt = np.flatnonzero(speech_vad) / VAD_RATE  # times of the speech frames (s)
    if len(vt) == 0:
        return np.zeros(n)
    k = np.searchsorted(vt, t)
    until = np.where(k < len(vt), vt[np.minimum(k, len(vt) - 1)] - t, np.inf)  # to the next speech frame
    since = np.where(k > 0, t - vt[np.maximum(k - 1, 0)], np.inf)  # since the last one

    def edge(d: np.ndarray, margin: float) -> np.ndarray:
        u = np.clip((margin - d) / GATE_RAMP_S, 0.0, 1.0)
        return u * u * (3.0 - 2.0 * u)  # smoothstep: no kink where the mouth starts to move

    return np.maximum(edge(until, GATE_LEAD_S), edge(since, GATE_TRAIL_S))


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d(x, sigma, mode="nearest"): the same kernel (radius int(4 sigma + 0.5)) and
    edges, without importing scipy.ndimage, which a one-shot `heygem-watch process` paid 0.3 s for."""
    x = np.asarray(x, np.float64)
    r = int(4.0 * sigma + 0.5)
    if r < 1 or len(x) == 0:
        return x.copy()
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return np.convolve(np.pad(x, r, mode="edge"), k / k.sum(), mode="valid")


def head_output(track, head, encoder=None) -> np.ndarray:
    """(n_frames, T) float32: the head over the streamed encoder features."""
    n = n_frames(track.n_samples)
    out = np.zeros((n, len(head.targets)), np.float32)
    for f0, y in head.predict_stream(whisper.encode_stream(track, encoder)):
        out[f0:f0 + len(y)] = y
    return out


def analyse_speech(track, head=None, encoder=None, chunk_s: float = CHUNK_S, detector=None) -> MouthCurve:
    """AudioTrack (16 kHz mono float32) -> MouthCurve at RATE frames/s. head: a head.SpeechHead (None = the
    shipped one); encoder: a whisper.Encoder (None = the process-wide one); detector: a vad.SpeechDetector (None =
    the process-wide one; False = loudness alone, as before 2026-12-07)."""
    if getattr(track, "sample_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"speech analysis needs {SAMPLE_RATE} Hz audio, got {track.sample_rate} Hz "
                         f"({getattr(track, 'path', 'track')})")
    if head is None:
        from heygem_watch.engines.builtin.head import load_head

        head = load_head()
    pred = head_output(track, head, encoder)
    return curves_from_head(pred, head.targets, speech_activity(track, chunk_s, detector))


def speech_activity(track, chunk_s: float = CHUNK_S, detector=None) -> np.ndarray:
    """bool (n,) per 10 ms frame: near speech the detector hears (vad.speech_decisions: music, game sound and
    applause are loud too), and either loud (voice_activity) or inside that speech itself.

    Loudness decides in the detector's padding around speech: that is what shuts the mouth in pauses too short for
    the detector (its 32 ms decisions, padded by vad.PAD_S). Inside speech the detector hears, it does not: speech's
    1-8 kHz level spans ~40 dB, and 12-14 % of the detector's speech frames in corpus/train/ lie more than DYN_DB
    under the loud level (more with some voices and microphones), so loudness alone shut mouths that were talking."""
    loud = voice_activity(open_band_level(track, chunk_s))
    if detector is False:
        return loud
    heard, near = vad.speech_decisions(track, len(loud), VAD_RATE, detector)
    return near & (loud | heard)
