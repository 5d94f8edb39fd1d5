"""Templates: an avatar video (or still photo), analysed once and cached under var/cache/templates/<fingerprint>/.

The cache holds the decoded frames as raw yuv420p (so later renders read frames instead of decoding them, and can
play the template backwards for ping-pong at no cost) and the face track (MediaPipe landmarks per frame). Its key is
the file's content fingerprint: an edited template gets a new entry, an unchanged one is never analysed again,
across recordings and restarts. A damaged entry is rebuilt. The entry folders themselves (where one lives, moving
a finished analysis into place, pruning) are template_cache.py's.
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
from heygem_watch.template_cache import entry_dir, install_entry, work_dir

CACHE_VERSION = 2  # bump when the cached layout or the face analysis changes (2: prefix caches, "complete")
FRAMES_NAME = "frames.yuv"
META_NAME = "meta.json"
TRACK_NAME = "track.npz"
MAX_TEMPLATE_FRAMES = 30 * 60 * 10  # 10 minutes at 30 fps; longer templates are cut (disk, analysis time)
# frames analysed beyond those an output shows: the face track is smoothed over time (face.smooth_landmarks), so
# the last shown frame gets the same smoothing as with the whole template analysed
SMOOTH_MARGIN = 3


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
    complete: bool = True  # False: only the first n_frames of a longer template are analysed (load_template)
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


def frame_count(duration_s: float, fps: Fraction) -> int:
    """Frames covering duration_s at fps (at least one)."""
    return max(1, int(round(duration_s * Fraction(fps))))


def load_template(path: os.PathLike | str, cache_root: os.PathLike | str, log=None,
                  duration_s: float | None = None) -> Template:
    """Open a template, analysing it on first use. Raises MediaError/TemplateError naming the file and the reason.

    duration_s: the output to render lasts this long, so only the template frames it shows are needed: an output
    shorter than the template plays frames 0..N-1 (ping-pong starts forwards), so only those are analysed, and a
    later, longer output extends the cached prefix. None: the whole template (the face check, the web UI)."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "template not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "template file is empty (0 bytes)")
    try:
        fp = fingerprint_file(path)
    except OSError as exc:
        raise MediaError(path, f"cannot read the template ({exc.strerror or exc})") from None
    cache_dir = entry_dir(cache_root, fp)
    tpl = _read_cache(path, fp, cache_dir)
    need = None
    if duration_s is not None:
        fps = tpl.fps if tpl is not None else _probe_fps(path)
        need = frame_count(duration_s, fps) + SMOOTH_MARGIN
    if tpl is not None and (tpl.complete or (need is not None and tpl.n_frames >= need)):
        tpl.cache_hit = True
        try:  # meta.json's mtime is the entry's last use: prune_cache keeps what is in use
            os.utime(cache_dir / META_NAME)
        except OSError:
            pass
        if log:
            log.info("template_cache_hit", template=path.name, frames=tpl.n_frames, cache=str(cache_dir))
        return tpl
    t0 = time.monotonic()
    if tpl is None and cache_dir.exists():
        if log:
            log.warning("template_cache_rebuild", template=path.name, cache=str(cache_dir))
        shutil.rmtree(cache_dir, ignore_errors=True)
    tmp = work_dir(cache_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prev = None
        if tpl is not None:  # a shorter prefix is cached: keep its frames and track, analyse only what follows
            shutil.copyfile(cache_dir / FRAMES_NAME, tmp / FRAMES_NAME)
            with np.load(cache_dir / TRACK_NAME) as z:
                prev = (z["raw"].astype(np.float32), z["face_found"].astype(bool), list(tpl.notes))
        meta, lms, found = _analyse(path, tmp, need, prev)
        smoothed = face.smooth_landmarks(lms, found)
        np.savez(tmp / TRACK_NAME, landmarks=smoothed, face_found=found, raw=lms)
        meta.update(version=CACHE_VERSION, fingerprint=fp, source=str(path), analysis_s=time.monotonic() - t0)
        (tmp / META_NAME).write_text(json.dumps(meta))
        install_entry(tmp, cache_dir, replace=tpl is not None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tpl = _read_cache(path, fp, cache_dir)
    if tpl is None:
        raise TemplateError(path, f"template analysis produced an unreadable cache in {cache_dir}")
    tpl.analysis_s = time.monotonic() - t0
    if log:
        log.info("template_analysed", template=path.name, frames=tpl.n_frames, complete=tpl.complete,
                 face_fraction=round(tpl.face_fraction, 3), seconds=round(tpl.analysis_s, 2))
    return tpl


def _probe_fps(path: Path) -> Fraction:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return DEFAULT_FPS
    with open_container(path) as c:
        if not c.streams.video:
            raise TemplateError(path, "has no video stream (a template must be a video or an image)")
        return stream_fps(c.streams.video[0])


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
                    complete=bool(meta["complete"]), notes=list(meta.get("notes", [])))


def _analyse(path: Path, out_dir: Path, need: int | None = None, prev=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Decode the template's first `need` frames (all when None): raw yuv420p appended to out_dir/FRAMES_NAME and
    the face tracked. prev = (raw landmarks, face_found, notes) of a cached prefix whose frames out_dir already
    holds: those frames are only decoded, not analysed again. Decoding and colour conversion run on their own
    thread, the face tracking on face.TrackPool's (two FaceMesh instances on two cores)."""
    import cv2

    notes: list[str] = list(prev[2]) if prev else []
    lms_list = list(prev[0]) if prev else []
    found_list = list(prev[1]) if prev else []
    skip = len(found_list)
    limit = MAX_TEMPLATE_FRAMES if need is None else min(need, MAX_TEMPLATE_FRAMES)
    spare: queue.SimpleQueue = queue.SimpleQueue()  # written yuv arrays, handed back to the decode thread to refill
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise TemplateError(path, "not a readable image")
        frames_iter = iter([_from_bgr(img)])
        fps, is_image = DEFAULT_FPS, True
    else:
        fps = _probe_fps(path)
        frames_iter = _threaded(_decode(path, notes, skip, limit, spare))
        is_image = False
    w = h = 0
    ended = True  # the whole template was read (the decoder ran out of frames before the limit)
    n = skip
    with open(out_dir / FRAMES_NAME, "ab") as raw, face.TrackPool(static_image=is_image) as pool:
        for (w0, h0), yuv, rgb in frames_iter:
            if not w:
                w, h = even_size(w0, h0)
                if (w, h) != (w0, h0) and not skip:
                    notes.append(f"odd frame size {w0}x{h0} cropped to {w}x{h} for H.264")
            raw.write(yuv.data)
            spare.put(yuv)
            pool.submit(n, rgb, w, h)
            n += 1
            if n >= limit:
                ended = False
                if limit == MAX_TEMPLATE_FRAMES:
                    notes.append(f"template longer than {MAX_TEMPLATE_FRAMES} frames: the rest is not used")
                    ended = True
                break
        tracked = pool.finish()
    for i in range(skip, n):
        pts = tracked[i]
        found_list.append(pts is not None)
        lms_list.append(pts if pts is not None else np.full((face.N_LANDMARKS, 2), np.nan, np.float32))
    if not found_list:
        raise TemplateError(path, "template has no decodable frames")
    if not w:  # a cached prefix and nothing after it: the template ends exactly there
        with open_container(path) as c:
            w, h = even_size(c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height)
    found = np.array(found_list, bool)
    if not found.any():
        raise TemplateError(path, "no face found in any frame of the template")
    meta = {"width": w, "height": h, "fps": f"{fps.numerator}/{fps.denominator}", "n_frames": len(found_list),
            "is_image": is_image, "complete": bool(is_image or ended), "notes": notes}
    return meta, np.stack(lms_list).astype(np.float32), found


def _detect_size(w: int, h: int) -> tuple[int, int]:
    """Size of the copy FaceMesh sees (face.DETECT_MAX_SIDE on the long side at most)."""
    scale = min(1.0, face.DETECT_MAX_SIDE / max(w, h))
    return (w, h) if scale == 1.0 else (round(w * scale), round(h * scale))


def _from_bgr(bgr: np.ndarray):
    """(source size, yuv420p (h*3/2, w) of the even-cropped frame, RGB for FaceMesh)."""
    import cv2

    h0, w0 = bgr.shape[:2]
    w, h = even_size(w0, h0)
    bgr = np.ascontiguousarray(bgr[:h, :w])
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)
    dw, dh = _detect_size(w, h)
    small = bgr if (dw, dh) == (w, h) else cv2.resize(bgr, (dw, dh), interpolation=cv2.INTER_AREA)
    return (w0, h0), yuv, cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


def _decode(path: Path, notes: list[str], skip: int, limit: int, spare=None):
    """Frames skip..limit-1 as _from_bgr's triples, straight from the decoder's yuv420p (no BGR round trip).
    spare: a queue of yuv arrays the consumer is done with, refilled instead of allocating (see _yuv420p)."""
    import av
    import cv2

    with open_container(path) as c:
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        i = 0
        try:
            for frame in c.decode(vs):
                if i >= limit:
                    break
                i += 1
                if i <= skip:
                    continue
                w0, h0 = frame.width, frame.height
                if w0 % 2 or h0 % 2:  # odd sizes are cropped (not scaled) to even, as H.264 needs
                    yield _from_bgr(frame.to_ndarray(format="bgr24"))
                    continue
                yuv = _yuv420p(frame, spare)
                dw, dh = _detect_size(w0, h0)
                if (dw, dh) == (w0, h0):
                    rgb = cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)
                elif dw % 2 == 0 and dh % 2 == 0:
                    rgb = _small_rgb(yuv, w0, h0, dw, dh)
                else:
                    rgb = frame.reformat(width=dw, height=dh, format="rgb24",
                                         interpolation=av.video.reformatter.Interpolation.AREA).to_ndarray()
                yield (w0, h0), yuv, rgb
        except av.error.FFmpegError as exc:
            notes.append(f"video decoding stopped early: {exc.strerror or exc}")


def _yuv420p(frame, spare=None) -> np.ndarray:
    """The frame as yuv420p (h*3/2, w), what to_ndarray(format="yuv420p") returns. A frame the decoder gives as
    yuv420p already has each plane's visible part copied once, into an array from `spare` when one is there:
    to_ndarray copies each frame twice (the planes, then np.hstack), both into new memory, which for a 1080p
    template costs about 0.4 ms a frame more (measured on latentsync_demo1_video, 250 frames: 0.1 s of CPU)."""
    if frame.format.name != "yuv420p" or any(p.line_size < p.width for p in frame.planes):
        return frame.to_ndarray(format="yuv420p")  # a conversion (yuvj420p, 10-bit, ...): swscale's, as before
    w, h = frame.width, frame.height
    out = None
    while spare is not None:
        try:
            out = spare.get_nowait()
        except queue.Empty:
            out = None
            break
        if out.shape == (h * 3 // 2, w):
            break
    if out is None:
        out = np.empty((h * 3 // 2, w), np.uint8)
    flat, pos = out.reshape(-1), 0
    for p in frame.planes:  # Y, U, V; each row padded to line_size bytes
        n = p.width * p.height
        rows = np.frombuffer(p, np.uint8, count=p.line_size * p.height).reshape(p.height, p.line_size)
        np.copyto(flat[pos:pos + n].reshape(p.height, p.width), rows[:, :p.width])
        pos += n
    return out


def _small_rgb(yuv: np.ndarray, w: int, h: int, dw: int, dh: int) -> np.ndarray:
    """yuv420p (h*3/2, w) -> RGB (dh, dw, 3), each plane area-averaged before the colour conversion: a third of
    swscale's time for a 1080p frame (the decode thread is what bounds analysis of large templates)."""
    import cv2

    i420 = np.empty((dh * 3 // 2, dw), np.uint8)
    cv2.resize(yuv[:h], (dw, dh), dst=i420[:dh], interpolation=cv2.INTER_AREA)
    q, dq = h // 4, dh // 4
    for k in range(2):  # U then V: each a (h/2, w/2) plane stored as h/4 rows of w
        src = yuv[h + k * q:h + (k + 1) * q].reshape(h // 2, w // 2)
        dst = i420[dh + k * dq:dh + (k + 1) * dq].reshape(dh // 2, dw // 2)
        cv2.resize(src, (dw // 2, dh // 2), dst=dst, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)


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
