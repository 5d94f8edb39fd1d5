"""Templates: an avatar video (or still photo), analysed once and cached under var/cache/templates/<fingerprint>/.

The cache holds the decoded frames as raw yuv420p (so later renders read frames instead of decoding them, and can
play the template backwards for ping-pong at no cost) as players show them (display.py: a phone's portrait video
turned upright, HDR made SDR), and the face track (MediaPipe landmarks per frame). Its key is
the file's content fingerprint: an edited template gets a new entry, an unchanged one is never analysed again,
across recordings and restarts. A damaged entry is rebuilt. The entry folders themselves (where one lives, moving
a finished analysis into place, pruning) are template_cache.py's.

Every frame is decoded into the entry on first use, but an output shorter than the template shows only its first
frames: those (the "prefix") are tracked, and after them only every LIBRARY_STRIDE-th frame, for the built-in
engine's mouth library. A later, longer output tracks the rest of its prefix from the cached frames (no decoding);
the face check (duration_s None) tracks every frame.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import time
from dataclasses import astuple, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from heygem_watch import display, face, template_frames
from heygem_watch.housekeeping import write_json_atomic
from heygem_watch.ledger import fingerprint_file
from heygem_watch.media import DEFAULT_FPS, IMAGE_EXTENSIONS, MediaError, even_size, open_container, stream_fps
from heygem_watch.template_cache import entry_dir, install_entry, work_dir

# bump when the cached layout or the face analysis changes (2: prefix caches, "complete"; 3: every frame decoded,
# the prefix and every LIBRARY_STRIDE-th frame after it tracked, "tracked" in track.npz; 4: frames as players show
# them, display.py: turned upright, HDR made SDR; full range made limited; "colour" in meta.json)
CACHE_VERSION = 4
# Entries of these versions hold the same bytes for a template whose frames players show as stored (no display
# matrix to apply, not HDR, limited range): such an entry has its meta.json rewritten to CACHE_VERSION on first use
# instead of the template being analysed again
SAME_WHEN_AS_STORED = (3,)
FRAMES_NAME = "frames.yuv"
META_NAME = "meta.json"
TRACK_NAME = "track.npz"
MAX_TEMPLATE_FRAMES = 30 * 60 * 10  # 10 minutes at 30 fps; longer templates are cut (disk, analysis time)
# frames analysed beyond those an output shows: the face track is smoothed over time (face.smooth_landmarks), so
# the last shown frame gets the same smoothing as with the whole template analysed
SMOOTH_MARGIN = 3
# Past the frames an output shows, FaceMesh sees only every LIBRARY_STRIDE-th frame (those with i % stride == 0):
# the built-in engine's mouth library needs mouths from the whole template (tracking only the shown frames made
# mouths move a third as much), but not from every frame. Measured on the judge's pairs: stride 3 scored as the
# whole template tracked (pooled correlation 0.6132 vs 0.6144, silence 0.198 vs 0.203) and skipped ~600 of 1900
# FaceMesh calls (4 ms of CPU each).
LIBRARY_STRIDE = 3


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
    # (n_frames,) bool: FaceMesh ran on the frame (None: every frame). Untracked frames: face_found False, NaN.
    tracked: np.ndarray | None = None
    analysis_s: float = 0.0  # seconds spent analysing (0 on a cache hit)
    cache_hit: bool = False
    notes: list[str] = field(default_factory=list)
    colour: display.Colour = field(default_factory=display.Colour)  # how the cached yuv420p is read; outputs say it

    def __post_init__(self):
        if self.tracked is None:
            self.tracked = np.ones(self.n_frames, bool)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def tracked_prefix(self) -> int:
        """Leading frames all tracked: outputs up to this many frames long are served (load_template)."""
        return leading_tracked(self.tracked)

    @property
    def complete(self) -> bool:
        """Every frame tracked (an output longer than the template, played ping-pong, needs that)."""
        return bool(self.tracked.all())

    @property
    def face_fraction(self) -> float:
        """Share of the tracked frames that have a face (untracked ones say nothing)."""
        n = int(self.tracked.sum())
        return float(self.face_found[self.tracked].sum() / n) if n else 0.0

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * 3 // 2

    def frame(self, i: int) -> np.ndarray:
        """Template frame i as (H, W, 3) uint8 BGR, read from the cache (no decoding)."""
        import cv2

        return cv2.cvtColor(self.yuv(i), cv2.COLOR_YUV2BGR_I420)

    def yuv(self, i: int) -> np.ndarray:
        """Template frame i as the cache stores it: yuv420p (H * 3 / 2, W) uint8, a writable copy of its own."""
        if not 0 <= i < self.n_frames:
            raise IndexError(f"template frame {i} out of range 0..{self.n_frames - 1}")
        out = np.empty((self.height * 3 // 2, self.width), np.uint8)
        with open(self.cache_dir / FRAMES_NAME, "rb") as f:
            f.seek(i * self.frame_bytes)
            got = f.readinto(memoryview(out).cast("B"))
        if got != self.frame_bytes:
            raise TemplateError(self.path, f"template cache is damaged (frame {i} missing); delete {self.cache_dir}")
        return out


def frame_count(duration_s: float, fps: Fraction) -> int:
    """Frames covering duration_s at fps (at least one)."""
    return max(1, int(round(duration_s * Fraction(fps))))


def leading_tracked(tracked: np.ndarray) -> int:
    """How many frames from the first are all tracked."""
    untracked = np.flatnonzero(~np.asarray(tracked, bool))
    return int(untracked[0]) if len(untracked) else len(tracked)


def first_tracked(i, prefix: int):
    """Whether a first analysis tracks frame i (an int or an array of them) when the first `prefix` are shown."""
    return (i < prefix) | (i % LIBRARY_STRIDE == 0)


def tracked_set(n: int, prefix: int) -> np.ndarray:
    """(n,) bool: the frames a first analysis tracks when the first `prefix` are shown."""
    return first_tracked(np.arange(n), prefix)


def load_template(path: os.PathLike | str, cache_root: os.PathLike | str, log=None,
                  duration_s: float | None = None, max_side: int = 0) -> Template:
    """Open a template, analysing it on first use. Raises MediaError/TemplateError naming the file and the reason.

    duration_s: the output to render lasts this long. An output shorter than the template plays frames 0..N-1
    (ping-pong starts forwards), so those N (and SMOOTH_MARGIN more) are tracked, and after them only every
    LIBRARY_STRIDE-th frame; every frame is still decoded into the cache. A later, longer output tracks the rest of
    its prefix from the cache. None: every frame tracked (the face check, the web UI).
    max_side: a template larger than this on its long side is cached (and rendered) scaled down to it
    (EncoderSettings.max_side, HEYGEM_MAX_SIDE); an entry made with another limit is made again. 0: its own size."""
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
    tpl = _read_cache(path, fp, cache_dir, max_side)
    need = MAX_TEMPLATE_FRAMES
    if duration_s is not None:
        fps = tpl.fps if tpl is not None else _probe_fps(path)
        need = min(need, frame_count(duration_s, fps) + SMOOTH_MARGIN)
    if tpl is not None and (tpl.complete or tpl.tracked_prefix >= need):
        tpl.cache_hit = True
        try:  # meta.json's mtime is the entry's last use: prune_cache keeps what is in use
            os.utime(cache_dir / META_NAME)
        except OSError:
            pass
        if log:
            log.info("template_cache_hit", template=path.name, frames=tpl.n_frames, cache=str(cache_dir),
                     tracked_prefix=tpl.tracked_prefix, complete=tpl.complete)
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
        if tpl is None:
            meta, lms, found, tracked = _analyse(path, tmp, need, max_side)
        else:  # the frames are all cached: track the rest of the longer prefix, keep what is tracked
            meta, lms, found, tracked = _extend(tpl, tmp, need)
        smoothed = face.smooth_landmarks(lms, found)
        np.savez(tmp / TRACK_NAME, landmarks=smoothed, face_found=found, raw=lms, tracked=tracked)
        meta.update(version=CACHE_VERSION, fingerprint=fp, source=str(path), analysis_s=time.monotonic() - t0,
                    tracked_prefix=leading_tracked(tracked), complete=bool(tracked.all()))
        (tmp / META_NAME).write_text(json.dumps(meta))
        install_entry(tmp, cache_dir, replace=tpl is not None)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # a write into the entry (frames.yuv: a full disk) names no file: say where, keeping the errno the
            # daemon's disk-full pause looks for
            raise OSError(exc.errno, exc.strerror, str(tmp)) from exc
        raise
    tpl = _read_cache(path, fp, cache_dir, max_side)
    if tpl is None:
        raise TemplateError(path, f"template analysis produced an unreadable cache in {cache_dir}")
    tpl.analysis_s = time.monotonic() - t0
    if log:
        log.info("template_analysed", template=path.name, frames=tpl.n_frames, tracked=int(tpl.tracked.sum()),
                 tracked_prefix=tpl.tracked_prefix, complete=tpl.complete,
                 face_fraction=round(tpl.face_fraction, 3), seconds=round(tpl.analysis_s, 2))
    return tpl


def _probe_fps(path: Path) -> Fraction:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return DEFAULT_FPS
    with open_container(path) as c:
        if not c.streams.video:
            raise TemplateError(path, "has no video stream (a template must be a video or an image)")
        return stream_fps(c.streams.video[0])


def _read_cache(path: Path, fp: str, cache_dir: Path, max_side: int = 0) -> Template | None:
    try:
        meta = json.loads((cache_dir / META_NAME).read_text())
        if meta.get("fingerprint") != fp:
            return None
        if meta.get("version") in SAME_WHEN_AS_STORED:
            colour = _colour_if_shown_as_stored(path, meta)
            if colour is not None:
                meta.update(version=CACHE_VERSION, colour=list(astuple(colour)))
                _rewrite_meta(cache_dir, meta)
        if meta.get("version") != CACHE_VERSION:
            return None
        w, h, n = int(meta["width"]), int(meta["height"]), int(meta["n_frames"])
        if template_frames.scaled_size(*meta.get("source_size", (w, h)), max_side) != (w, h):
            return None  # made under another HEYGEM_MAX_SIDE
        if (cache_dir / FRAMES_NAME).stat().st_size != n * w * h * 3 // 2:
            return None
        with np.load(cache_dir / TRACK_NAME) as z:
            lms, found = z["landmarks"].astype(np.float32), z["face_found"].astype(bool)
            tracked = z["tracked"].astype(bool)
        if lms.shape != (n, face.N_LANDMARKS, 2) or found.shape != (n,) or tracked.shape != (n,):
            return None
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return Template(path, fp, cache_dir, w, h, Fraction(meta["fps"]), n, bool(meta["is_image"]), lms,
                    found & tracked, tracked, notes=list(meta.get("notes", [])),
                    colour=display.Colour(*meta["colour"]) if meta.get("colour") else display.Colour())


def _colour_if_shown_as_stored(path: Path, meta: dict) -> display.Colour | None:
    """The cached frames' Colour when players show the template's frames as stored (see SAME_WHEN_AS_STORED): a
    still, or a video whose first frame has no display matrix to apply, is not HDR, is limited range and has square
    pixels. None otherwise, or when that cannot be read (the entry is then rebuilt)."""
    if meta.get("is_image"):
        return display.STILL_COLOUR
    try:
        with open_container(path) as c:
            for frame in c.decode(c.streams.video[0]):
                look = display.look_of(frame, c.streams.video[0])
                return display.stored_colour(frame, look) if look.as_stored else None
    except Exception:  # noqa: BLE001 - unreadable now: analysing it again reports why, naming the file
        return None
    return None


def _rewrite_meta(cache_dir: Path, meta: dict) -> None:
    """Replace an entry's meta.json whole (readers see the old or the new file, never part of one)."""
    try:
        write_json_atomic(cache_dir / META_NAME, meta)
    except OSError:  # a read-only cache still serves this run; the check is simply made again next time
        pass


def _analyse(path: Path, out_dir: Path, prefix: int, max_side: int = 0) -> tuple[dict, np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """Decode the template (MAX_TEMPLATE_FRAMES at most, scaled to max_side) into out_dir/FRAMES_NAME as raw yuv420p
    and track the face on its first `prefix` frames and every LIBRARY_STRIDE-th after them. Decoding and colour
    conversion run on their own thread, the face tracking on face.TrackPool's (two FaceMesh instances on two cores)."""
    import cv2

    notes: list[str] = []
    facts: dict = {}  # the stream's colour and size, from its first frame
    spare: queue.SimpleQueue = queue.SimpleQueue()  # written yuv arrays, handed back to the decode thread to refill
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # EXIF orientation applied
        if img is None:
            raise TemplateError(path, "not a readable image")
        h0, w0 = img.shape[:2]
        size = template_frames.scaled_size(w0, h0, max_side)
        if size != even_size(w0, h0):
            notes.append(f"{w0}x{h0} scaled to {size[0]}x{size[1]} (HEYGEM_MAX_SIDE={max_side})")
        frames_iter = iter([template_frames.from_bgr(template_frames.fit(img, size))])
        fps, is_image = DEFAULT_FPS, True
        facts.update(colour=display.STILL_COLOUR, source_size=(w0, h0))
    else:
        fps = _probe_fps(path)
        frames_iter = template_frames.threaded(template_frames.decode(
            path, notes, MAX_TEMPLATE_FRAMES, spare, want=lambda i: first_tracked(i, prefix), facts=facts,
            max_side=max_side))
        is_image = False
    w = h = n = 0
    with open(out_dir / FRAMES_NAME, "ab") as raw, face.TrackPool(static_image=is_image) as pool:
        for (w0, h0), yuv, rgb in frames_iter:
            if not w:
                w, h = even_size(w0, h0)
                if (w, h) != (w0, h0):
                    notes.append(f"odd frame size {w0}x{h0} cropped to {w}x{h} for H.264")
            raw.write(yuv.data)
            spare.put(yuv)
            if rgb is not None:
                pool.submit(n, rgb, w, h)
            n += 1
            if n >= MAX_TEMPLATE_FRAMES:
                notes.append(f"template longer than {MAX_TEMPLATE_FRAMES} frames: the rest is not used")
                break
        results = pool.finish()
    if not n:
        raise TemplateError(path, "template has no decodable frames")
    tracked = tracked_set(n, prefix)
    lms, found = _track_arrays(n, results)
    if not found.any() and tracked.all():
        raise TemplateError(path, "no face found in any frame of the template")
    if not found.any():  # nothing in the sampled frames: look at every frame before giving up
        tpl = Template(path, "", out_dir, w, h, fps, n, is_image, lms, found, tracked)
        _, lms, found, tracked = _extend(tpl, out_dir, n, in_place=True)
        if not found.any():
            raise TemplateError(path, "no face found in any frame of the template")
    meta = {"width": w, "height": h, "fps": f"{fps.numerator}/{fps.denominator}", "n_frames": n,
            "is_image": is_image, "notes": notes, "colour": list(astuple(facts.get("colour", display.Colour()))),
            "source_size": list(facts.get("source_size", (w, h)))}
    return meta, lms, found, tracked


def _extend(tpl: Template, out_dir: Path, prefix: int, in_place: bool = False):
    """Track the untracked frames among tpl's first `prefix` from its cached frames (read, not decoded) into a new
    entry in out_dir (in_place: out_dir is tpl's own folder, still being written); what is tracked is kept."""
    if in_place:
        lms, found, tracked = tpl.landmarks.copy(), tpl.face_found.copy(), tpl.tracked.copy()
        meta: dict = {}
    else:
        _link_or_copy(tpl.cache_dir / FRAMES_NAME, out_dir / FRAMES_NAME)
        with np.load(tpl.cache_dir / TRACK_NAME) as z:
            lms, found, tracked = z["raw"].astype(np.float32), z["face_found"].astype(bool), z["tracked"].astype(bool)
        meta = json.loads((tpl.cache_dir / META_NAME).read_text())
        for k in ("version", "fingerprint", "source", "analysis_s", "tracked_prefix", "complete"):
            meta.pop(k, None)
    todo = np.flatnonzero(~tracked[:prefix]).tolist()
    w, h = tpl.width, tpl.height
    with face.TrackPool(static_image=tpl.is_image) as pool:
        for i, rgb in template_frames.threaded((i, template_frames.rgb_from_yuv(tpl.yuv(i), w, h)) for i in todo):
            pool.submit(i, rgb, w, h)
        results = pool.finish()
    new_lms, new_found = _track_arrays(len(tracked), results)
    lms[todo], found[todo] = new_lms[todo], new_found[todo]
    tracked[todo] = True
    return meta, lms, found, tracked


def _track_arrays(n: int, results: dict) -> tuple[np.ndarray, np.ndarray]:
    """TrackPool's {i: landmarks or None} -> (landmarks (n, 478, 2), NaN where none, face_found (n,))."""
    lms = np.full((n, face.N_LANDMARKS, 2), np.nan, np.float32)
    found = np.zeros(n, bool)
    for i, pts in results.items():
        if pts is not None:
            lms[i], found[i] = pts, True
    return lms, found


def _link_or_copy(src: Path, dst: Path) -> None:
    """The frames file never changes once written: a hard link shares it (a 1080p minute is 5.6 GB to copy)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
