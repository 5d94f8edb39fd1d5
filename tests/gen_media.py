"""Synthetic recordings for the daemon tests (faces come from tests/mediagen.py): speech-like audio, tiny
H.264 + AAC files via PyAV, and the broken inputs the issue lists. Everything is made on the fly, in tmp."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests import mediagen

SR = 16000  # Hz
TINY = (64, 48)  # (width, height) of recordings' video: the daemon only takes their audio


def speech(seconds: float, rate: int = SR, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts (harmonics of ~130 Hz, ~4 per second), float32 in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(130 + 10 * np.sin(2 * np.pi * 0.5 * t)) / rate
    src = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None)
    x = src * env
    return (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def tone(seconds: float, freq: float = 440.0, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SR) -> Path:
    """16-bit PCM WAV through the standard library (no PyAV needed)."""
    import wave

    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def write_av(path: Path, seconds: float = 1.0, *, audio: np.ndarray | None | bool = True, video: bool = True,
             fps: int = 25, rate: int = SR, fmt: str | None = None) -> Path:
    """A tiny recording: H.264 (moving gradient) and/or AAC, container by extension (.flv, .mp4, .mkv, .m4a).
    audio=True -> speech(seconds); an array -> that; None/False -> no audio track."""
    if audio is True:
        audio = speech(seconds, rate)
    has_audio = audio is not None and audio is not False
    w, h = TINY
    yy, xx = np.mgrid[0:h, 0:w]
    frames = (np.stack([(xx * 4 + i * 3) % 256, (yy * 5) % 256, np.full_like(xx, 128)], -1).astype(np.uint8)
              for i in range(int(round(seconds * fps)))) if video else None
    return mediagen.write_video(path, frames, fps, np.asarray(audio, np.float32) if has_audio else None, rate, fmt)


def truncate(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    """The first `fraction` of src's bytes (an OBS crash mid-recording)."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def text_file(path: Path) -> Path:
    path.write_text("this is not a video, just text with a video extension\n" * 20)
    return path


def face_png(path: Path, size: tuple[int, int] = (240, 288)) -> Path:
    """A still avatar template (the photo face from tests/mediagen.py), size = (width, height)."""
    import cv2

    img = cv2.resize(mediagen.face_photo(), size, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), img)
    return path


def faceless_png(path: Path, size: tuple[int, int] = (160, 120)) -> Path:
    import cv2

    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = (60, 140, 200)
    cv2.rectangle(img, (20, 20), (80, 80), (255, 255, 255), -1)
    cv2.imwrite(str(path), img)
    return path


def face_video(path: Path, n: int = 12, faceless: frozenset = frozenset(), size: tuple[int, int] = (192, 224),
               fps: int = 25) -> Path:
    """A short template video of the photo face; frames listed in `faceless` show a plain wall."""


    return mediagen.write_video(path, mediagen.face_frames(n, size=(size[1], size[0]), faceless=faceless), fps=fps)
