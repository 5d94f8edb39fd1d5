"""Template mouth analysis and frame selection for the built-in engine.

analyse_mouths(template) -> MouthLibrary: per template frame, mouth descriptors measured from the (smoothed)
landmarks in a head-pose-normalised frame (x along the eye line, unit = inter-ocular distance, origin = mouth
centre), plus teeth visibility and sharpness measured on the luma of a small mouth crop. Cached as an .npz in
template.cache_dir, rebuilt when missing or damaged.

Selector: a fixed-lag Viterbi pass over the library. Every output frame asks for a mouth (openness, width); the
pass picks the template frame whose mouth matches, preferring runs of consecutive template frames so the mouth
moves like the person's own mouth instead of flicking through stills.
"""
from __future__ import annotations

import mmap
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heygem_watch import face, template_frames

# v3: the template's tracked frames (a count saved beside) are part of the key: an entry tracked further (a longer
# output extended its prefix, see template.load_template) gets a new library
CACHE_NAME = "builtin_mouth_v3.npz"
RELEASE_EVERY = 32  # frame reads between releases of the cache mapping's resident pages
MAX_LIBRARY = 2400  # frames kept as selection candidates (longer templates are strided): Viterbi is O(frames)
MOUTH_CROP_SCALE = 0.45  # half-size of the analysis crop around the mouth, inter-ocular units
TEETH_MIN_LUMA = 150  # teeth are bright...
TEETH_MAX_CHROMA = 22  # ...and nearly grey (|U-128| + |V-128|, 8-bit)
DEFAULT_TEETH_BGR = (200, 212, 222)  # used when the template never shows teeth (warm off-white, BGR)

# Selection costs (dimensionless; openness/width are in inter-ocular units).
OPEN_SCALE = 0.025  # an openness miss of this much costs 1
UNDER_WEIGHT = 3.0  # ... times this when the frame is less open than wanted: compose draws a mouth narrower than its
# source exactly (the lips cover the interior), but a wider one only partly (its extra opening is synthesised, and
# reads as less open)
WIDTH_SCALE = 0.06
WIDTH_WEIGHT = 0.3
POSE_SCALE = 0.05  # yaw/pitch proxy difference costing 1 (times POSE_WEIGHT)
POSE_WEIGHT = 0.6
BLUR_WEIGHT = 0.4  # cost for the blurriest frame of the library, 0 for the sharpest
COST_STAY = 0.6  # showing the same template frame twice (a frozen mouth)
COST_BACK = 0.3  # stepping one frame backwards (reverse motion is natural enough)
COST_JUMP = 2.5  # anywhere else in the template: a cut in the mouth's motion
LAG = 8  # output frames the selector waits before committing to a choice

LOWER_INNER = [95, 88, 178, 87, 14, 317, 402, 318, 324]
UPPER_INNER = [191, 80, 81, 82, 13, 312, 311, 310, 415]
LOWER_OUTER = [146, 91, 181, 84, 17, 314, 405, 321, 375]
UPPER_OUTER = [185, 40, 39, 37, 0, 267, 269, 270, 409]
CORNERS = [61, 291, 78, 308]


@dataclass
class MouthLibrary:
    """Per template frame (n,): openness, width, rounding (outer height / width), teeth (0..1 fraction of the
    inner mouth that is teeth), sharpness (0..1 rank), pose (n, 2) yaw/pitch proxies; valid marks usable frames.
    candidates: indices of frames the selector may pick; teeth_bgr: typical teeth colour."""

    openness: np.ndarray
    width: np.ndarray
    rounding: np.ndarray
    teeth: np.ndarray
    sharpness: np.ndarray
    pose: np.ndarray
    valid: np.ndarray
    candidates: np.ndarray
    teeth_bgr: np.ndarray

    @property
    def n(self) -> int:
        return len(self.openness)

    def open_range(self) -> tuple[float, float]:
        """(closed, wide) openness of this person, from the frames that have a face."""
        o = self.openness[self.valid]
        if len(o) == 0:
            return 0.0, 0.0
        return float(np.percentile(o, 3)), float(np.percentile(o, 97))


def head_frame(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Head-pose frame of one face (478, 2): (origin = mouth centre, 2x2 rotation whose rows are the head's x/y
    axes, iod in pixels). Normalised coords = R @ (p - origin) / iod."""
    ex = lm[face.EYE_OUTER_R] - lm[face.EYE_OUTER_L]
    iod = float(np.hypot(*ex)) + 1e-6
    ux = ex / iod
    rot = np.array([[ux[0], ux[1]], [-ux[1], ux[0]]], np.float64)
    origin = 0.5 * (lm[face.UPPER_LIP_INNER_MID] + lm[face.LOWER_LIP_INNER_MID])
    return origin.astype(np.float64), rot, iod


def normalise(lm: np.ndarray) -> np.ndarray:
    """(478, 2) pixel landmarks -> head-normalised coordinates (478, 2)."""
    origin, rot, iod = head_frame(lm)
    return (lm - origin) @ rot.T / iod


def descriptors(lm: np.ndarray) -> np.ndarray:
    """Geometric mouth descriptors of landmarks (..., 478, 2): (..., 5) = openness, width, rounding, yaw, pitch.
    openness is the judges' measure (inner gap 13-14 / iod); yaw/pitch are nose-tip offsets from the eye midpoint
    in the head frame (they separate head poses that a similarity transform cannot align)."""
    iod = face.inter_ocular(lm) + 1e-6
    gap = np.linalg.norm(lm[..., 13, :] - lm[..., 14, :], axis=-1) / iod
    width = np.linalg.norm(lm[..., 61, :] - lm[..., 291, :], axis=-1) / iod
    height = np.linalg.norm(lm[..., 0, :] - lm[..., 17, :], axis=-1) / iod
    ex = (lm[..., face.EYE_OUTER_R, :] - lm[..., face.EYE_OUTER_L, :]) / iod[..., None]
    mid = 0.5 * (lm[..., face.EYE_OUTER_R, :] + lm[..., face.EYE_OUTER_L, :])
    d = (lm[..., face.NOSE_TIP, :] - mid) / iod[..., None]
    yaw = d[..., 0] * ex[..., 0] + d[..., 1] * ex[..., 1]
    pitch = -d[..., 0] * ex[..., 1] + d[..., 1] * ex[..., 0]
    return np.stack([gap, width, height / (width + 1e-6), yaw, pitch], axis=-1)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src (k, 2) onto dst (k, 2): 2x3."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    den = (a ** 2).sum() + 1e-9
    c = (a * b).sum() / den
    s = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum() / den
    m = np.array([[c, -s], [s, c]])
    return np.hstack([m, (md - m @ ms)[:, None]])


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _planes_reader(template):
    """i -> (Y, U, V) planes of template frame i: views of one memmap of the raw yuv420p cache when it is there
    (no colour conversion, no copy), else converted from template.frame(i)."""
    raw = Path(template.cache_dir) / "frames.yuv"
    w, h = template.width, template.height
    fb = w * h * 3 // 2
    mm = mapping = None
    try:
        if raw.stat().st_size == template.n_frames * fb:
            with open(raw, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mm = np.frombuffer(mapping, np.uint8).reshape(template.n_frames, fb)
    except (OSError, ValueError):
        mm = None
    calls = [0]

    def planes(i: int):
        if mm is not None:
            calls[0] += 1
            if calls[0] % RELEASE_EVERY == 0 and hasattr(mapping, "madvise"):
                # Pages read through the mapping count as this process's memory until released: without this a
                # long template would show up as gigabytes of RSS (they stay in the page cache; a later read
                # simply maps them again)
                mapping.madvise(mmap.MADV_DONTNEED)
            return template_frames.planes(mm[i], w, h)
        import cv2

        return template_frames.planes(cv2.cvtColor(template.frame(i), cv2.COLOR_BGR2YUV_I420), w, h)

    return planes


_READERS: dict = {}


def _frame_planes(template, i: int):
    """(Y, U, V) planes of template frame i (one reader per template and cache folder, kept for reuse)."""
    key = (str(template.cache_dir), template.n_frames, template.width, template.height)
    rd = _READERS.get(key)
    if rd is None:
        if len(_READERS) > 16:
            _READERS.clear()
        rd = _READERS[key] = _planes_reader(template)
    return rd(i)


def read_crop(template, i: int, rect: tuple[int, int, int, int]) -> np.ndarray:
    """BGR crop (h, w, 3) of template frame i at rect=(x0, y0, w, h), clipped to the frame and padded by edge
    replication back to the asked size; converts only those pixels (a 1080p frame costs what its mouth costs)."""
    import cv2

    x0, y0, w, h = rect
    cx0, cy0, cx1, cy1 = template_frames.even_box(rect, template.width, template.height)
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        return np.zeros((max(1, h), max(1, w), 3), np.uint8)
    bgr = template_frames.crop_bgr(_frame_planes(template, i), (cx0, cy0, cx1, cy1))
    top, left = cy0 - y0, cx0 - x0  # negative when the even-aligned crop starts before rect
    bgr = bgr[max(0, -top):, max(0, -left):]
    top, left = max(0, top), max(0, left)
    return cv2.copyMakeBorder(bgr, top, max(0, h - top - bgr.shape[0]), left, max(0, w - left - bgr.shape[1]),
                              cv2.BORDER_REPLICATE)[:h, :w]


def _appearance(template, i: int, lm: np.ndarray) -> tuple[float, float, np.ndarray | None]:
    """(teeth fraction, luma sharpness, mean BGR of teeth pixels or None) for frame i."""
    import cv2

    y, u, v = _frame_planes(template, i)
    origin, _, iod = head_frame(lm)
    r = max(4, int(MOUTH_CROP_SCALE * iod))
    x0, y0 = max(0, int(origin[0]) - r) & ~1, max(0, int(origin[1]) - r) & ~1
    x1, y1 = min(template.width, int(origin[0]) + r), min(template.height, int(origin[1]) + r)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return 0.0, 0.0, None
    yc = np.asarray(y[y0:y1, x0:x1], np.float32)
    uc = np.asarray(u[y0 // 2:(y1 + 1) // 2, x0 // 2:(x1 + 1) // 2], np.float32)
    vc = np.asarray(v[y0 // 2:(y1 + 1) // 2, x0 // 2:(x1 + 1) // 2], np.float32)
    sharp = float(cv2.Laplacian(yc, cv2.CV_32F).var()) / (r * r) * 1e3
    inner = np.round(lm[face.LIPS_INNER] - (x0, y0)).astype(np.int32)
    mask = np.zeros(yc.shape, np.uint8)
    cv2.fillPoly(mask, [inner], 1)
    n_in = int(mask.sum())
    if n_in < 6:
        return 0.0, sharp, None
    uu = cv2.resize(uc, (yc.shape[1], yc.shape[0]), interpolation=cv2.INTER_NEAREST) - 128
    vv = cv2.resize(vc, (yc.shape[1], yc.shape[0]), interpolation=cv2.INTER_NEAREST) - 128
    teeth = (mask > 0) & (yc > TEETH_MIN_LUMA) & (np.abs(uu) + np.abs(vv) < TEETH_MAX_CHROMA)
    nt = int(teeth.sum())
    bgr = None
    if nt >= 6:
        yy, u1, v1 = yc[teeth].mean(), uu[teeth].mean(), vv[teeth].mean()
        # BT.601 (what OpenCV's I420 conversion uses)
        bgr = np.array([yy + 2.032 * u1, yy - 0.395 * u1 - 0.581 * v1, yy + 1.140 * v1])
    return nt / n_in, sharp, bgr


def analyse_mouths(template) -> MouthLibrary:
    """Descriptors for every tracked frame of the template (cached in template.cache_dir); untracked frames are
    not valid, never candidates."""
    path = Path(template.cache_dir) / CACHE_NAME
    tracked = getattr(template, "tracked", None)
    n_tracked = template.n_frames if tracked is None else int(np.count_nonzero(tracked))
    lib = _load(path, template.n_frames, n_tracked)
    if lib is not None:
        return lib
    lms = np.asarray(template.landmarks, np.float32)
    valid = np.asarray(template.face_found, bool) & np.isfinite(lms).all(axis=(1, 2))
    n = template.n_frames
    desc = np.zeros((n, 5), np.float32)
    if valid.any():
        desc[valid] = descriptors(lms[valid].astype(np.float64))
    teeth = np.zeros(n, np.float32)
    sharp = np.zeros(n, np.float32)
    teeth_cols = []
    idx = np.flatnonzero(valid)
    cand = idx if len(idx) <= MAX_LIBRARY else idx[np.linspace(0, len(idx) - 1, MAX_LIBRARY).astype(int)]
    for i in cand:
        teeth[i], sharp[i], col = _appearance(template, int(i), lms[i])
        if col is not None and teeth[i] > 0.15:
            teeth_cols.append(col)
    if len(cand):
        ranks = np.argsort(np.argsort(sharp[cand]))
        sharp[cand] = ranks / max(1, len(cand) - 1)
    # zeros = never seen: the renderer derives a colour from the face's light instead
    teeth_bgr = np.median(teeth_cols, axis=0) if teeth_cols else np.zeros(3)
    lib = MouthLibrary(desc[:, 0], desc[:, 1], desc[:, 2], teeth, sharp, desc[:, 3:5], valid, cand.astype(np.int32),
                       np.clip(teeth_bgr, 0, 255).astype(np.float32))
    _save(path, lib, n_tracked)
    return lib


def _save(path: Path, lib: MouthLibrary, n_tracked: int) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, n_tracked=n_tracked, **lib.__dict__)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the analysis next time
        tmp.unlink(missing_ok=True)


def _load(path: Path, n: int, n_tracked: int) -> MouthLibrary | None:
    try:
        with np.load(path) as z:
            lib = MouthLibrary(**{k: z[k] for k in MouthLibrary.__dataclass_fields__})
            if int(z["n_tracked"]) != n_tracked:
                return None
    except (OSError, ValueError, KeyError, EOFError, TypeError):
        return None
    if lib.n != n or lib.valid.shape != (n,) or lib.pose.shape != (n, 2):
        return None
    return lib


class Selector:
    """Fixed-lag Viterbi over the library's candidate frames.

    push(open, width, pose) for each output frame in order; it returns the template frames decided so far (lagging
    LAG frames behind); flush() returns the rest. Memory is O(LAG * candidates)."""

    def __init__(self, lib: MouthLibrary, lag: int = LAG):
        self.lib, self.lag = lib, lag
        self.cand = lib.candidates
        k = len(self.cand)
        if k == 0:
            raise ValueError("mouth library has no usable frame")
        c = self.cand
        # consecutive in the library's candidate order = consecutive template frames (up to the stride)
        self._o, self._w = lib.openness[c].astype(np.float64), lib.width[c].astype(np.float64)
        self._pose = lib.pose[c].astype(np.float64)
        self._blur = BLUR_WEIGHT * (1.0 - lib.sharpness[c].astype(np.float64))
        self.cost: np.ndarray | None = None
        self.back: deque[np.ndarray] = deque()

    def unary(self, open_t: float, width_t: float, pose: np.ndarray | None) -> np.ndarray:
        d = self._o - open_t
        u = (d / OPEN_SCALE) ** 2 * np.where(d < 0, UNDER_WEIGHT, 1.0)
        u += WIDTH_WEIGHT * ((self._w - width_t) / WIDTH_SCALE) ** 2
        if pose is not None and np.isfinite(pose).all():
            u += POSE_WEIGHT * (((self._pose - pose) / POSE_SCALE) ** 2).sum(1)
        return u + self._blur

    def push(self, open_t: float, width_t: float, pose: np.ndarray | None = None) -> list[int]:
        u = self.unary(open_t, width_t, pose)
        k = len(u)
        if self.cost is None:
            self.cost = u
            self.back.append(np.arange(k, dtype=np.int32))
        else:
            prev = self.cost
            best = int(np.argmin(prev))
            opts = np.full((4, k), np.inf)
            opts[0, 1:] = prev[:-1]  # advance one frame: free
            opts[1] = prev + COST_STAY
            opts[2, :-1] = prev[1:] + COST_BACK
            opts[3] = prev[best] + COST_JUMP
            choice = np.argmin(opts, axis=0)
            ar = np.arange(k)
            src = np.where(choice == 0, ar - 1, np.where(choice == 1, ar, np.where(choice == 2, ar + 1, best)))
            self.cost = u + opts[choice, ar]
            self.cost -= self.cost.min()
            self.back.append(src.astype(np.int32))
        out = []
        if len(self.back) > self.lag:
            out.append(self._commit())
        return out

    def _commit(self) -> int:
        """Decide the oldest pending frame: follow every live path back to it, keep only those through the best."""
        idx = np.arange(len(self.cost))
        for bp in list(self.back)[:0:-1]:
            idx = bp[idx]
        chosen = int(idx[int(np.argmin(self.cost))])
        self.cost = np.where(idx == chosen, self.cost, np.inf)
        self.cost -= self.cost[np.isfinite(self.cost)].min()
        self.back.popleft()  # the new oldest entry's pointers lead to the committed frame: never followed again
        return int(self.cand[chosen])

    def flush(self) -> list[int]:
        """Decisions for every pending frame (end of the job stream)."""
        if self.cost is None:
            return []
        idx = int(np.argmin(self.cost))
        path = [idx]
        for bp in list(self.back)[:0:-1]:
            idx = int(bp[idx])
            path.append(idx)
        self.cost, self.back = None, deque()
        return [int(self.cand[i]) for i in reversed(path)]
