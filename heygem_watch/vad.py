"""Speech detection: is what sounds in the recording a voice? Silero VAD on onnxruntime.

    detector = load_detector()                      once per process (the daemon keeps it), ~0.2 s with the import
    p = detector.probabilities(track)               float32 (n,), speech probability of frame i = samples
                                                    i*FRAME .. (i+1)*FRAME (32 ms)
    mask = speech_mask(p, n_vad, vad_rate)          bool (n_vad,) at vad_rate: frames near detected speech
    mask = speech_frames(track, n, rate)            the two above in one (what the ONNX engine's gate asks)
    heard, near = speech_decisions(track, n, rate)  the model's own decisions, and those padded (the built-in's)

The loudness gate (speech.voice_activity) says when the mouth's band is loud; loud is not speech. Between a
streamer's sentences there is music, game sound, applause, and the gate opened the mouth for all of it (76 % of a
33 s film soundtrack with no voice in it). The learned head then moved the mouth with whatever it heard. This model
tells speech from the rest: the mouth moves only near speech it hears, and where it hears speech, quieter speech than
the loudness gate lets through moves it too (speech.speech_activity).

The model is Silero VAD (MIT) in its "sequence" ONNX form (MODEL_FILE), read from the installed `silero-vad` wheel,
which setup.sh installs without its dependencies: its own Python helpers need torch, which a plain dependency would
pull in (a multi-GB CUDA build); we only read the ONNX file, never import the package. The file must hash to
MODEL_SHA256 (pinned with the version), anything else is refused. Inputs, as documented by the model: rows of
CONTEXT + FRAME samples at 16 kHz, each starting with the last CONTEXT samples of the previous frame; the LSTM state
(h, c) carried from one call to the next, so blocks of any length give exactly the one-pass result.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

DIST = "silero-vad"
VERSION = "6.2.3"
MODEL_FILE = "silero_vad/data/silero_vad_16k_sequence.onnx"  # inside the wheel, 16 kHz, many frames per call
MODEL_SHA256 = "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85"
SAMPLE_RATE = 16000  # Hz: the only rate this model takes (and what audio.AudioTrack holds)
FRAME = 512  # samples per probability: 32 ms
CONTEXT = 64  # samples of the previous frame at the start of each row
STATE = 128  # LSTM width
BLOCK_FRAMES = 512  # frames per onnxruntime call (16.4 s): memory stays flat on a 2-hour recording
# Speech starts where the probability rises over ON and lasts until it falls under OFF: the model's documented
# defaults (threshold 0.5, negative threshold 0.15 under it), not tuned here.
ON, OFF = 0.5, 0.35
# Loud frames this close to detected speech still count as speech: the model's decisions are 32 ms frames and its
# onsets lag the voice, while the loudness gate times the edges to 10 ms (and lips part before the sound).
PAD_S = 0.2
INSTALL_HINT = f"run ./setup.sh, or: pip install --no-deps {DIST}=={VERSION}"


class VadModelError(RuntimeError):
    """The speech-detection model is missing or not the expected file (message names it and the fix)."""


def model_path() -> Path:
    """Where the installed silero-vad wheel keeps MODEL_FILE (the package itself is never imported: it needs torch)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise VadModelError(f"the {DIST} package (its speech-detection model) is not installed; {INSTALL_HINT}") \
            from None
    if dist.version != VERSION:
        raise VadModelError(f"{DIST} {dist.version} is installed, heygem-watch needs {VERSION} (its model's hash is "
                            f"pinned); {INSTALL_HINT}")
    return Path(dist.locate_file(MODEL_FILE))


def model_bytes() -> bytes:
    """MODEL_FILE's bytes, once they hash to MODEL_SHA256 (VadModelError naming the file otherwise)."""
    path = model_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VadModelError(f"{path}: cannot read the speech-detection model ({exc.strerror or exc}); "
                            f"{INSTALL_HINT}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_SHA256:
        raise VadModelError(f"{path}: sha256 {digest}, expected {MODEL_SHA256}: the file is damaged or not "
                            f"{DIST} {VERSION}'s; reinstall it ({INSTALL_HINT}), refusing to load")
    return data


class SpeechDetector:
    """The model in one single-threaded onnxruntime session; probabilities() is serialised (one session)."""

    def __init__(self, data: bytes):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1  # a 2 MB LSTM: more threads only add overhead, the renderer wants the cores
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self._session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def probabilities(self, track, block_frames: int = BLOCK_FRAMES) -> np.ndarray:
        """float32 (track.n_samples // FRAME,): speech probability per 32 ms frame, read block by block from the
        track (anything with n_samples and read(start, count) of 16 kHz float32, like audio.AudioTrack)."""
        if getattr(track, "sample_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise ValueError(f"speech detection needs {SAMPLE_RATE} Hz audio, got {track.sample_rate} Hz")
        n = track.n_samples // FRAME
        out = np.zeros(n, np.float32)
        h = np.zeros((1, 1, STATE), np.float32)
        c = np.zeros((1, 1, STATE), np.float32)
        tail = np.zeros(CONTEXT, np.float32)
        with self._lock:
            for f0 in range(0, n, block_frames):
                m = min(block_frames, n - f0)
                frames = np.asarray(track.read(f0 * FRAME, m * FRAME), np.float32).reshape(m, FRAME)
                rows = np.empty((m, CONTEXT + FRAME), np.float32)
                rows[:, CONTEXT:] = frames
                rows[0, :CONTEXT] = tail
                rows[1:, :CONTEXT] = frames[:-1, -CONTEXT:]
                tail = frames[-1, -CONTEXT:].copy()
                p, h, c = self._session.run(None, {"input": rows, "h": h, "c": c})
                out[f0:f0 + m] = np.asarray(p, np.float32).reshape(-1)
        return out


def speech_mask(prob: np.ndarray, n: int, rate: int) -> np.ndarray:
    """bool (n,) at `rate` frames/s: True within PAD_S of a frame the model calls speech (hysteresis ON / OFF)."""
    return padded(hysteresis(prob), n, rate)


def padded(on: np.ndarray, n: int, rate: int) -> np.ndarray:
    """bool (n,) at `rate` frames/s: True within PAD_S of a 32 ms frame whose decision (hysteresis's) is speech."""
    t = np.arange(n) / rate
    hit = np.flatnonzero(on)
    if len(hit) == 0:
        return np.zeros(n, bool)
    starts = (hit * FRAME) / SAMPLE_RATE  # each speech frame covers [start, start + FRAME / SAMPLE_RATE)
    k = np.searchsorted(starts, t, side="right")
    # distance from t to the nearest speech frame's span, before or after it
    prev_end = np.where(k > 0, starts[np.maximum(k - 1, 0)] + FRAME / SAMPLE_RATE, -np.inf)
    next_start = np.where(k < len(starts), starts[np.minimum(k, len(starts) - 1)], np.inf)
    return (t - prev_end <= PAD_S) | (next_start - t <= PAD_S)


def hysteresis(prob: np.ndarray) -> np.ndarray:
    """bool (len(prob),): speech from a probability over ON until one under OFF (starting as not speech). Over ON
    always means speech and under OFF never does; in between a frame keeps the last decision made outside that band,
    so the decisions are those marks carried forward. Compared in float64, as the thresholds are written."""
    prob = np.asarray(prob, np.float64)
    decided = (prob > ON) | (prob < OFF)
    last = np.maximum.accumulate(np.where(decided, np.arange(len(prob)), -1))
    return np.where(last >= 0, prob[np.maximum(last, 0)] > ON, False)


def at_rate(decisions: np.ndarray, n: int, rate: int) -> np.ndarray:
    """bool (n,) at `rate` frames/s from per-FRAME decisions: frame i takes the decision of the 32 ms frame its time
    falls in (False past the last)."""
    k = np.floor(np.arange(n) / rate * SAMPLE_RATE / FRAME).astype(np.int64)
    inside = k < len(decisions)
    out = np.zeros(n, bool)
    out[inside] = np.asarray(decisions, bool)[k[inside]]
    return out


def speech_decisions(track, n: int, rate: int,
                     detector: "SpeechDetector | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """(heard, near): bool (n,) each at `rate` frames/s over the track. heard: inside a stretch the detector (None:
    the process-wide one) calls speech (hysteresis, no padding); near: within PAD_S of one (speech_frames)."""
    on = hysteresis((detector or load_detector()).probabilities(track))
    return at_rate(on, n, rate), padded(on, n, rate)


def speech_frames(track, n: int, rate: int, detector: "SpeechDetector | None" = None) -> np.ndarray:
    """bool (n,) at `rate` frames/s over the track: within PAD_S of what the detector (None: the process-wide one)
    calls speech."""
    return speech_mask((detector or load_detector()).probabilities(track), n, rate)


@lru_cache(maxsize=1)
def load_detector() -> SpeechDetector:
    """The process-wide detector (loaded once; VadModelError when the model is missing or damaged)."""
    return SpeechDetector(model_bytes())
