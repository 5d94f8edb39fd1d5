"""Template frames for analysis: decoded straight to the yuv420p the cache stores, with the small RGB copy FaceMesh
sees made only for the frames it will see, on the decoder's thread (template.py tracks them, face.TrackPool).
The same RGB copy is made from a cached frame (Template.yuv) when an entry's face track is extended (no decoding).
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from heygem_watch import display, face, hdr
from heygem_watch.display import Orientation, upright
from heygem_watch.media import even_size, open_container


def detect_size(w: int, h: int) -> tuple[int, int]:
    """Size of the copy FaceMesh sees (face.DETECT_MAX_SIDE on the long side at most)."""
    scale = min(1.0, face.DETECT_MAX_SIDE / max(w, h))
    return (w, h) if scale == 1.0 else (round(w * scale), round(h * scale))


def from_bgr(bgr: np.ndarray, want_rgb: bool = True):
    """(source size, yuv420p (h*3/2, w) of the even-cropped frame, RGB for FaceMesh or None when not wanted)."""
    import cv2

    h0, w0 = bgr.shape[:2]
    w, h = even_size(w0, h0)
    bgr = np.ascontiguousarray(bgr[:h, :w])
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)
    if not want_rgb:
        return (w0, h0), yuv, None
    dw, dh = detect_size(w, h)
    small = bgr if (dw, dh) == (w, h) else cv2.resize(bgr, (dw, dh), interpolation=cv2.INTER_AREA)
    return (w0, h0), yuv, cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


def planes(yuv: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y (h, w), U (h/2, w/2), V (h/2, w/2)): views of a contiguous yuv420p frame, (h*3/2, w) or flat (writable if
    it is)."""
    flat, n, q = yuv.reshape(-1), w * h, w * h // 4
    return flat[:n].reshape(h, w), flat[n: n + q].reshape(h // 2, w // 2), flat[n + q:].reshape(h // 2, w // 2)


def even_box(rect: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): rect=(x, y, w, h) clipped to a w x h frame and grown to even edges (chroma is 2x2)."""
    x0, y0, rw, rh = rect
    cx0, cy0 = max(0, x0) & ~1, max(0, y0) & ~1
    cx1, cy1 = min(w, x0 + rw), min(h, y0 + rh)
    return cx0, cy0, min(w, cx1 + (cx1 - cx0) % 2), min(h, cy1 + (cy1 - cy0) % 2)


def crop_bgr(yuv_planes, box: tuple[int, int, int, int]) -> np.ndarray:
    """BGR (y1-y0, x1-x0, 3) of an even box of a frame's (Y, U, V): only those pixels converted."""
    import cv2

    y, u, v = yuv_planes
    x0, y0, x1, y1 = box
    parts = (y[y0:y1, x0:x1], u[y0 // 2:y1 // 2, x0 // 2:x1 // 2], v[y0 // 2:y1 // 2, x0 // 2:x1 // 2])
    return cv2.cvtColor(join_planes(*parts), cv2.COLOR_YUV2BGR_I420)


def join_planes(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A contiguous yuv420p frame (h*3/2, w) from its planes Y (h, w), U and V (h/2, w/2): planes()'s inverse."""
    return np.concatenate([np.asarray(p).reshape(-1) for p in (y, u, v)]).reshape(-1, y.shape[1])


def paste_bgr(yuv_planes, box: tuple[int, int, int, int], bgr: np.ndarray) -> None:
    """Write a BGR (y1-y0, x1-x0, 3) image into an even box of a frame's (Y, U, V), in place."""
    import cv2

    y, u, v = yuv_planes
    x0, y0, x1, y1 = box
    i420 = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV_I420).reshape(-1)
    n, q = (x1 - x0) * (y1 - y0), (x1 - x0) * (y1 - y0) // 4
    y[y0:y1, x0:x1] = i420[:n].reshape(y1 - y0, x1 - x0)
    u[y0 // 2:y1 // 2, x0 // 2:x1 // 2] = i420[n:n + q].reshape((y1 - y0) // 2, (x1 - x0) // 2)
    v[y0 // 2:y1 // 2, x0 // 2:x1 // 2] = i420[n + q:].reshape((y1 - y0) // 2, (x1 - x0) // 2)


def rgb_from_yuv(yuv: np.ndarray, w: int, h: int) -> np.ndarray:
    """FaceMesh's RGB copy of a cached yuv420p (h*3/2, w) frame: what decode() makes from the decoded frame."""
    import cv2

    dw, dh = detect_size(w, h)
    if (dw, dh) == (w, h):
        return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)
    if dw % 2 == 0 and dh % 2 == 0:
        return small_rgb(yuv, w, h, dw, dh)
    small = cv2.resize(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_I420), (dw, dh), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)


def decode(path: Path, notes: list[str], limit: int, spare=None, want: Callable[[int], bool] | None = None,
           facts: dict | None = None, max_side: int = 0):
    """Frames 0..limit-1 as from_bgr's triples, straight from the decoder's yuv420p (no BGR round trip), as players
    show them (display.look_of: turned upright, HDR made SDR; its notes go to `notes`).
    spare: a queue of yuv arrays the consumer is done with, refilled instead of allocating (see yuv420p).
    want(i): False when frame i is only stored, not tracked: its RGB copy is skipped (None).
    facts: a dict that gets the stream's "colour" (display.Colour: how the yielded yuv420p is read) and "source_size"
    (w, h as players show it, before scaling). max_side: frames larger than that on their long side are scaled down
    (scaled_size); 0 keeps them."""
    import av

    with open_container(path) as c:
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        i = 0
        look = None
        try:
            for frame in c.decode(vs):
                if i >= limit:
                    break
                if look is None:  # one per stream: the first frame's
                    look = display.look_of(frame, vs)
                    notes.extend(look.notes)
                    shown = look.shown_size(frame.width, frame.height)
                    size = scaled_size(*shown, max_side)
                    if size != even_size(*shown):
                        notes.append(f"{shown[0]}x{shown[1]} scaled to {size[0]}x{size[1]} "
                                     f"(HEYGEM_MAX_SIDE={max_side})")
                    if facts is not None:
                        facts.update(colour=display.stored_colour(frame, look), source_size=shown)
                rgb_wanted = want is None or want(i)
                i += 1
                w0, h0 = frame.width, frame.height
                if w0 % 2 or h0 % 2:  # odd sizes are cropped (not scaled) to even, as H.264 needs
                    yield from_bgr(fit(display.picture(frame, look), size), rgb_wanted)
                    continue
                if look.transfer is not None:
                    yuv = hdr.to_sdr_yuv420p(frame, look.transfer)
                else:
                    yuv = yuv420p(frame, spare)
                if look.orientation != display.UPRIGHT:  # a turned copy (the consumer's spares then mostly go unused)
                    yuv = upright_yuv(yuv, w0, h0, look.orientation)
                    w0, h0 = (h0, w0) if look.orientation[0] else (w0, h0)
                if (w0, h0) != size:
                    yuv, (w0, h0) = scale_yuv(yuv, w0, h0, size), size
                if not rgb_wanted:
                    yield (w0, h0), yuv, None
                    continue
                dw, dh = detect_size(w0, h0)
                if (dw, dh) == (w0, h0) or (dw % 2 == 0 and dh % 2 == 0) or not look.as_stored:
                    rgb = rgb_from_yuv(yuv, w0, h0)
                else:
                    rgb = frame.reformat(width=dw, height=dh, format="rgb24",
                                         interpolation=av.video.reformatter.Interpolation.AREA).to_ndarray()
                yield (w0, h0), yuv, rgb
        except av.error.FFmpegError as exc:
            notes.append(f"video decoding stopped early: {exc.strerror or exc}")


def scaled_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    """(w, h) of a template as cached: even, and at most max_side on the long side (0: no limit), shape kept."""
    if max_side <= 0 or max(w, h) <= max_side:
        return even_size(w, h)
    s = max_side / max(w, h)
    return max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2)


def fit(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A BGR picture scaled to size (w, h); as it is when it is that size or one more (from_bgr crops an odd size
    to even)."""
    import cv2

    h, w = bgr.shape[:2]
    if size[0] <= w <= size[0] + 1 and size[1] <= h <= size[1] + 1:
        return bgr
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if size[0] <= w and size[1] <= h else cv2.INTER_LINEAR)


def scale_yuv(yuv: np.ndarray, w: int, h: int, size: tuple[int, int]) -> np.ndarray:
    """A yuv420p (h*3/2, w) frame scaled plane by plane to size (w', h'), both even: area averaging down,
    bilinear where a side grows (square pixels from anamorphic ones)."""
    import cv2

    tw, th = size
    how = cv2.INTER_AREA if tw <= w and th <= h else cv2.INTER_LINEAR  # anamorphic pixels can widen a picture
    y, u, v = planes(yuv, w, h)
    return join_planes(cv2.resize(y, (tw, th), interpolation=how),
                       *(cv2.resize(p, (tw // 2, th // 2), interpolation=how) for p in (u, v)))


def upright_yuv(yuv: np.ndarray, w: int, h: int, o: Orientation) -> np.ndarray:
    """A yuv420p (h*3/2, w) frame turned upright plane by plane: (h'*3/2, w'), w' x h' as players show it."""
    return join_planes(*(upright(p, o) for p in planes(yuv, w, h)))


def yuv420p(frame, spare=None) -> np.ndarray:
    """The frame as yuv420p (h*3/2, w), what to_ndarray(format="yuv420p") returns. A frame the decoder gives as
    yuv420p already has each plane's visible part copied once, into an array from `spare` when one is there:
    to_ndarray copies each frame twice (the planes, then np.hstack), both into new memory, which for a 1080p
    template costs about 0.4 ms a frame more (measured on latentsync_demo1_video, 250 frames: 0.1 s of CPU)."""
    if display.full_range(frame):  # made limited: OpenCV's I420 conversions in the engines assume it (and clip)
        from av.video.reformatter import ColorRange

        return frame.reformat(format="yuv420p", src_color_range=ColorRange.JPEG,
                              dst_color_range=ColorRange.MPEG).to_ndarray()
    if frame.format.name != "yuv420p" or any(p.line_size < p.width for p in frame.planes):
        return frame.to_ndarray(format="yuv420p")  # a conversion (10-bit, 4:2:2, ...): swscale's
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


def small_rgb(yuv: np.ndarray, w: int, h: int, dw: int, dh: int) -> np.ndarray:
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


def threaded(it, depth: int = 4):
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
