"""Synthetic media for tests: a real face (a public-domain photo shipped inside matplotlib, which mediapipe
depends on), moved a little from frame to frame, and speech-like audio. Nothing here is copied from ../shared/media."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

SR = 16000


def face_photo() -> np.ndarray:
    """Grace Hopper (US Navy photo, public domain), (600, 512, 3) uint8 BGR."""
    import cv2
    import matplotlib.cbook as cbook

    img = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def face_frames(n: int, size: tuple[int, int] = (320, 384), faceless: set[int] | frozenset = frozenset(),
                mouth_open: np.ndarray | None = None):
    """n BGR frames (h, w = size) of the photo with a slow head sway; frames in `faceless` show a plain wall.
    mouth_open: optional (n,) 0..1, stretches the lower lip region downwards to fake an opening mouth."""
    import cv2

    base = face_photo()
    h, w = size
    for i in range(n):
        if i in faceless:
            yield np.full((h, w, 3), (90, 120, 150), np.uint8)
            continue
        dx, dy = 6 * np.sin(i / 9.0), 4 * np.sin(i / 13.0)
        img = base
        if mouth_open is not None and mouth_open[i] > 0:
            img = _open_mouth(base, float(mouth_open[i]))
        m = np.float32([[w / base.shape[1], 0, dx], [0, w / base.shape[1], dy - 20]])
        yield cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


def _open_mouth(img: np.ndarray, amount: float) -> np.ndarray:
    """Crude jaw drop below the lip line of the photo (lips at y~279, x 230..305) with a dark gap."""
    import cv2

    out = img.copy()
    y0, x0, x1 = 279, 228, 308
    gap = int(round(amount * 14))
    if gap <= 0:
        return out
    below = img[y0:y0 + 60, x0:x1]
    out[y0 + gap:y0 + 60 + gap, x0:x1] = below[: out[y0 + gap:y0 + 60 + gap, x0:x1].shape[0]]
    out[y0:y0 + gap, x0 + 8:x1 - 8] = (40, 30, 60)
    return cv2.GaussianBlur(out, (3, 3), 0)


def write_video(path: Path, frames, fps: Fraction | float = 25, audio: np.ndarray | None = None,
                audio_rate: int = SR, fmt: str | None = None, display: tuple[float, bool] | None = None,
                colour: tuple[int, int, int, int] | None = None, sar: Fraction | None = None) -> Path:
    """H.264 (+ AAC when audio is given) in MP4/FLV/MKV by extension; frames=None writes audio only.
    display=(degrees counter-clockwise, mirrored): the display matrix a phone writes; frames are stored as given.
    colour=(matrix, primaries, transfer, range) in FFmpeg's numbers: the tags the stream carries (pixels unchanged).
    sar: the pixels' width over height (anamorphic video), as tagged; frames are stored as given."""
    import av

    frames = iter(frames) if frames is not None else None
    first = next(frames) if frames is not None else None
    fps = Fraction(fps).limit_denominator(100000)
    with av.open(str(path), "w", format=fmt) as out:
        vs = None
        if first is not None:
            vs = out.add_stream("libx264", rate=fps)
            vs.height, vs.width = first.shape[:2]
            vs.pix_fmt = "yuv420p"
            vs.codec_context.options = {"preset": "ultrafast"}
            if display is not None:
                vs.set_display_rotation(display[0], hflip=display[1])
            if sar is not None:
                vs.codec_context.sample_aspect_ratio = sar
            if colour is not None:
                cc = vs.codec_context
                cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = colour
        as_ = out.add_stream("aac", rate=audio_rate, layout="mono") if audio is not None else None

        audio_pos = 0  # samples muxed so far: audio is interleaved with the video, as a real recorder writes it

        def put_audio(until_s: float) -> None:
            nonlocal audio_pos
            while as_ is not None and audio_pos < len(audio) and audio_pos < until_s * audio_rate:
                chunk = audio[None, audio_pos:audio_pos + 1024].astype(np.float32)
                fr = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                fr.sample_rate, fr.pts = audio_rate, audio_pos
                audio_pos += 1024
                for p in as_.encode(fr):
                    out.mux(p)

        n = 0

        def put(img):
            nonlocal n
            put_audio(n / fps)
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")):
                out.mux(p)
            n += 1

        if vs is not None:
            put(first)
            for img in frames:
                put(img)
            for p in vs.encode(None):
                out.mux(p)
        if as_ is not None:
            put_audio(float("inf"))
            for p in as_.encode(None):
                out.mux(p)
    return path


def quadrants(h: int = 96, w: int = 160) -> np.ndarray:
    """BGR blocks no turn or mirror maps onto themselves: four coloured quadrants and a white block top left."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (40, 40, 200)
    img[: h // 2, w // 2:] = (40, 200, 40)
    img[h // 2:, : w // 2] = (200, 40, 40)
    img[h // 2:, w // 2:] = (200, 200, 40)
    img[: h // 4, : w // 8] = 250
    return img


def sdr_to_hdr_signal(bgr: np.ndarray, transfer: str) -> np.ndarray:
    """An SDR BT.709 picture (gamma 2.4) placed in HDR as ITU-R BT.2408 places SDR content: SDR white at the HDR
    reference white, 203 cd/m2; BT.2020 primaries; the HLG (BT.2100 inverse OOTF for a 1000 cd/m2 display, then
    OETF) or PQ (ST 2084 inverse EOTF) signal, (H, W, 3) float64 R'G'B' 0..1. Written from the standards' formulas
    independently of heygem_watch/hdr.py, which goes the other way."""
    rgb = (bgr[..., ::-1] / 255.0) ** 2.4 * 203.0  # display light, cd/m2, BT.709 primaries
    to2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114], [0.0164, 0.0880, 0.8956]])  # BT.2087
    rgb = rgb @ to2020.T
    if transfer == "PQ":
        y = np.clip(rgb / 10000.0, 0, 1) ** (2610 / 16384)
        return ((3424 / 4096 + 2413 / 128 * y) / (1 + 2392 / 128 * y)) ** (2523 / 32)
    yd = rgb @ np.array([0.2627, 0.6780, 0.0593])  # display luminance
    scene = rgb / 1000.0 * (np.maximum(yd, 1e-9) / 1000.0)[..., None] ** ((1 - 1.2) / 1.2)  # inverse OOTF
    a, b, c = 0.17883277, 0.28466892, 0.55991073
    return np.where(scene <= 1 / 12, np.sqrt(3 * scene), a * np.log(np.maximum(12 * scene - b, 1e-12)) + c)


def write_hdr_video(path: Path, frames, transfer: str, fps: float = 25) -> Path:
    """10-bit H.264 (High 10) tagged BT.2020 + HLG or PQ, as a phone records HDR, of SDR BGR frames placed in HDR
    (sdr_to_hdr_signal)."""
    import av
    from av.video.reformatter import ColorRange, Colorspace

    with av.open(str(path), "w") as out:
        vs = None
        for img in frames:
            if vs is None:
                vs = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
                vs.height, vs.width = img.shape[:2]
                vs.pix_fmt = "yuv420p10le"
                cc = vs.codec_context
                cc.color_primaries, cc.colorspace, cc.color_range = 9, 9, 1  # BT.2020, BT.2020 NCL, limited
                cc.color_trc = {"HLG": 18, "PQ": 16}[transfer]
                cc.options = {"preset": "ultrafast"}
            sig = np.round(sdr_to_hdr_signal(img, transfer) * 65535).astype(np.uint16)
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(sig), format="rgb48le").reformat(
                format="yuv420p10le", dst_colorspace=Colorspace.BT2020, dst_color_range=ColorRange.MPEG)
            for p in vs.encode(fr):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    return path


def write_audio(path: Path, audio: np.ndarray, rate: int = SR) -> Path:
    """Audio-only file (WAV/M4A/MP3... by extension)."""
    import av

    codec = {".wav": "pcm_s16le", ".m4a": "aac", ".aac": "aac", ".mp3": "libmp3lame", ".flac": "flac",
             ".ogg": "libvorbis"}[path.suffix.lower()]
    with av.open(str(path), "w") as out:
        st = out.add_stream(codec, rate=rate, layout="mono")
        fmt = "s16" if codec == "pcm_s16le" else st.codec_context.format.name
        for s in range(0, len(audio), 1024):
            chunk = audio[s:s + 1024].astype(np.float32)
            if fmt.startswith("s16"):
                arr = (np.clip(chunk, -1, 1) * 32767).astype(np.int16)[None]
            else:
                arr = chunk[None]
            fr = av.AudioFrame.from_ndarray(arr, format=fmt if fmt in ("s16", "flt", "fltp", "s16p") else "flt",
                                            layout="mono")
            fr.sample_rate, fr.pts = rate, s
            for p in st.encode(fr):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return path


def speech_like(seconds: float, rate: int = SR, gaps: list[tuple[float, float]] | None = None, seed: int = 0) -> np.ndarray:
    """Voiced 'syllables' (120 Hz harmonics through two formants, ~4 per second) separated by short pauses;
    `gaps` lists (start_s, end_s) of digital silence. float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 120 + 15 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    src = sum(np.sin(k * phase) / k for k in range(1, 25))
    env = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 0.7
    env *= 0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t) ** 2
    x = (src * env).astype(np.float32)
    x += 0.003 * rng.standard_normal(n).astype(np.float32)
    for a, b in gaps or []:
        x[int(a * rate):int(b * rate)] = 0
    return (0.3 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


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


def syllables(seconds, seed=11):
    """Speech-like syllables: vowels of random pitch, formants and loudness with short pauses between them."""
    rng = np.random.default_rng(seed)
    parts, n = [], 0
    while n < seconds * SR:
        parts += [vowel(rng.uniform(0.1, 0.3), f0=rng.uniform(100, 200),
                        formants=(rng.uniform(400, 900), rng.uniform(1000, 2200)), amp=rng.uniform(0.1, 0.3),
                        seed=int(rng.integers(1000))), silence(rng.uniform(0.02, 0.12))]
        n = sum(len(p) for p in parts)
    return np.concatenate(parts)[: int(seconds * SR)]


def music(seconds, seed=0):
    """Piano-like chords (three decaying harmonic notes, two chords a second) over a drum pattern (noise bursts every
    0.25 s): loud across the mouth's band, no voice in it."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    x = np.zeros(n)
    for start in np.arange(0, seconds, 0.5):
        root = 220 * 2 ** (rng.integers(0, 12) / 12)
        i0 = int(start * SR)
        tt = t[i0:] - start
        for ratio in (1.0, 1.26, 1.5):
            f = root * ratio
            x[i0:] += sum(np.sin(2 * np.pi * k * f * tt) / k ** 1.5 for k in range(1, 8)) * np.exp(-3 * tt)
    for start in np.arange(0, seconds, 0.25):
        i0 = int(start * SR)
        m = min(n - i0, int(0.08 * SR))
        x[i0:i0 + m] += 2 * rng.standard_normal(m) * np.exp(-np.arange(m) / (0.02 * SR))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def spoken(text: str, voice: str = "en", rate: int = SR) -> np.ndarray:
    """Speech synthesised by Debian's espeak-ng (installed by setup.sh as root), float32 mono at `rate`: a voice the
    speech detector hears as one, which the synthetic syllables above are only some of the time."""
    import io
    import shutil
    import subprocess
    import wave

    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    assert exe, "needs Debian's espeak-ng: apt-get install -y espeak-ng (setup.sh does, as root)"
    wav = subprocess.run([exe, "--stdout", "-v", voice, "-s", "150", text], capture_output=True, check=True,
                         timeout=60).stdout
    with wave.open(io.BytesIO(wav)) as w:
        src, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    g = np.gcd(src, rate)
    return resample_poly(x, rate // g, src // g).astype(np.float32)
