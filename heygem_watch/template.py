"""Templates: an avatar video (or still photo), analysed once and cached under var/cache/templates/<fingerprint>/.

The cache holds the decoded frames as raw yuv420p (so later renders read frames instead of decoding them, and can
play the template backwards for ping-pong at no cost) and the face track (MediaPipe landmarks per frame). Its key is
the file's content fingerprint: an edited template gets a new entry, an unchanged one is never analysed again,
across recordings and restarts. A damaged entry is rebuilt.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import queue
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from heygem_watch import face
from heygem_watch.ledger import fingerprint_file
from heygem_watch.media import (DEFAULT_FPS, IMAGE_EXTENSIONS, MediaError, even_size, open_container,
                                stream_fps)

CACHE_VERSION = 1  # bump when the cached layout or the face analysis changes
FRAMES_NAME = "frames.yuv"
META_NAME = "meta.json"
TRACK_NAME = "track.npz"
MAX_TEMPLATE_FRAMES = 30 * 60 * 10  # 10 minutes at 30 fps; longer templates are cut (disk, analysis time)


class TemplateError(MediaError):
    """The template cannot be used (no frames, no face at all, ...)."""


@dataclass
class Template:
    path: Path
    fingerprint: str
    cache_dir: Path
    width: int
    height: int
    fps: Fraction
    n_frames: int
    is_image: bool
    landmarks: np.ndarray  # (n_frames, 478, 2) float32 pixel (x, y), NaN where no face, smoothed over time
    face_found: np.ndarray  # (n_frames,) bool
    analysis_s: float = 0.0  # seconds spent analysing (0 on a cache hit)
    cache_hit: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def face_fraction(self) -> float:
        return float(self.face_found.mean()) if self.n_frames else 0.0

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * 3 // 2

    def frame(self, i: int) -> np.ndarray:
        """Template frame i as (H, W, 3) uint8 BGR, read from the cache (no decoding)."""
        import cv2

        if not 0 <= i < self.n_frames:
            raise IndexError(f"template frame {i} out of range 0..{self.n_frames - 1}")
        with open(self.cache_dir / FRAMES_NAME, "rb") as f:
            f.seek(i * self.frame_bytes)
            buf = f.read(self.frame_bytes)
        if len(buf) != self.frame_bytes:
            raise TemplateError(self.path, f"template cache is damaged (frame {i} missing); delete {self.cache_dir}")
        yuv = np.frombuffer(buf, np.uint8).reshape(self.height * 3 // 2, self.width)
        return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_I420)


def load_template(path: os.PathLike | str, cache_root: os.PathLike | str, log=None) -> Template:
    """Open a template, analysing it on first use. Raises MediaError/TemplateError naming the file and the reason."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "template not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "template file is empty (0 bytes)")
    try:
        fp = fingerprint_file(path)
    except OSError as exc:
        raise MediaError(path, f"cannot read the template ({exc.strerror or exc})") from None
    cache_dir = Path(cache_root) / "templates" / fp[:32]
    tpl = _read_cache(path, fp, cache_dir)
    if tpl is not None:
        tpl.cache_hit = True
        if log:
            log.info("template_cache_hit", template=path.name, frames=tpl.n_frames, cache=str(cache_dir))
        return tpl
    t0 = time.monotonic()
    if cache_dir.exists():
        if log:
            log.warning("template_cache_rebuild", template=path.name, cache=str(cache_dir))
        shutil.rmtree(cache_dir, ignore_errors=True)
    tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}.{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta, lms, found = _analyse(path, tmp)
        smoothed = face.smooth_landmarks(lms, found)
        np.savez(tmp / TRACK_NAME, landmarks=smoothed, face_found=found, raw=lms)
        meta.update(version=CACHE_VERSION, fingerprint=fp, source=str(path), analysis_s=time.monotonic() - t0)
        (tmp / META_NAME).write_text(json.dumps(meta))
        try:
            os.replace(tmp, cache_dir)
        except OSError:  # another process finished the same template first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tpl = _read_cache(path, fp, cache_dir)
    if tpl is None:
        raise TemplateError(path, f"template analysis produced an unreadable cache in {cache_dir}")
    tpl.analysis_s = time.monotonic() - t0
    if log:
        log.info("template_analysed", template=path.name, frames=tpl.n_frames, face_fraction=round(tpl.face_fraction, 3),
                 seconds=round(tpl.analysis_s, 2))
    return tpl


def _read_cache(path: Path, fp: str, cache_dir: Path) -> Template | None:
    try:
        meta = json.loads((cache_dir / META_NAME).read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fp:
            return None
        w, h, n = int(meta["width"]), int(meta["height"]), int(meta["n_frames"])
        if (cache_dir / FRAMES_NAME).stat().st_size != n * w * h * 3 // 2:
            return None
        with np.load(cache_dir / TRACK_NAME) as z:
            lms, found = z["landmarks"].astype(np.float32), z["face_found"].astype(bool)
        if lms.shape != (n, face.N_LANDMARKS, 2) or found.shape != (n,):
            return None
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return Template(path, fp, cache_dir, w, h, Fraction(meta["fps"]), n, bool(meta["is_image"]), lms, found,
                    notes=list(meta.get("notes", [])))


def _analyse(path: Path, out_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Decode every frame once: write raw yuv420p to out_dir and track the face. Decoding runs on a second thread
    so decode and FaceMesh overlap on two cores."""
    import cv2

    notes: list[str] = []
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise TemplateError(path, "not a readable image")
        frames_iter = iter([img])
        fps, is_image = DEFAULT_FPS, True
    else:
        with open_container(path) as c:
            if not c.streams.video:
                raise TemplateError(path, "has no video stream (a template must be a video or an image)")
            fps = stream_fps(c.streams.video[0])
        frames_iter = _threaded(_decode_bgr(path, notes))
        is_image = False
    lms_list, found_list = [], []
    w = h = 0
    with open(out_dir / FRAMES_NAME, "wb") as raw, face.FaceMesh(static_image=is_image) as mesh:
        for bgr in frames_iter:
            if not w:
                h0, w0 = bgr.shape[:2]
                w, h = even_size(w0, h0)
                if (w, h) != (w0, h0):
                    notes.append(f"odd frame size {w0}x{h0} cropped to {w}x{h} for H.264")
            bgr = np.ascontiguousarray(bgr[:h, :w])
            raw.write(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).tobytes())
            pts = mesh.detect(bgr)
            found_list.append(pts is not None)
            lms_list.append(pts if pts is not None else np.full((face.N_LANDMARKS, 2), np.nan, np.float32))
            if len(found_list) >= MAX_TEMPLATE_FRAMES:
                notes.append(f"template longer than {MAX_TEMPLATE_FRAMES} frames: the rest is not used")
                break
    if not found_list:
        raise TemplateError(path, "template has no decodable frames")
    found = np.array(found_list, bool)
    if not found.any():
        raise TemplateError(path, "no face found in any frame of the template")
    meta = {"width": w, "height": h, "fps": f"{fps.numerator}/{fps.denominator}", "n_frames": len(found_list),
            "is_image": is_image, "notes": notes}
    return meta, np.stack(lms_list).astype(np.float32), found


def _decode_bgr(path: Path, notes: list[str]):
    errors: list[str] = []
    from heygem_watch.media import iter_video_frames

    yield from iter_video_frames(path, "bgr24", errors)
    notes.extend(errors)


def _threaded(it, depth: int = 4):
    """Run a generator on its own thread with a bounded queue (decode overlaps analysis)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    err: list[BaseException] = []

    def pump():
        try:
            for x in it:
                q.put(x)
        except BaseException as exc:
            err.append(exc)
        finally:
            q.put(done)

    t = threading.Thread(target=pump, daemon=True, name="template-decode")
    t.start()
    while True:
        x = q.get()
        if x is done:
            break
        yield x
    t.join()
    if err:
        raise err[0]
