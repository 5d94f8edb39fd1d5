"""Face landmarks: MediaPipe FaceMesh (the 0.10.21 wheel ships its models; nothing is downloaded).

Landmarks are (478, 2) float32 pixel coordinates (x, y) in the full frame: the 468-point mesh plus 10 iris points
(refine_landmarks=True also sharpens the lip contour, which the mouth work depends on).
"""
from __future__ import annotations

import os
import threading

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

N_LANDMARKS = 478
# MediaPipe runs on a downscaled copy when the frame is larger than this (pixels on the long side): detection
# quality is unchanged for a face that fills a reasonable part of the frame, and 1080p costs as little as 720p.
DETECT_MAX_SIDE = 960
MIN_DETECTION_CONFIDENCE = 0.5
MIN_TRACKING_CONFIDENCE = 0.5
# Template analysis tracks with this many FaceMesh instances at once (MediaPipe releases the GIL: two instances use
# two cores), each taking blocks of TRACK_BLOCK consecutive frames in turn. More than two rarely pays: decoding and
# the rest of the job share the cores.
TRACK_WORKERS = min(2, os.cpu_count() or 1)
TRACK_BLOCK = 50
_IMPORT_LOCK = threading.Lock()  # see _face_mesh_module

UPPER_LIP_INNER_MID = 13
LOWER_LIP_INNER_MID = 14
MOUTH_LEFT = 61
MOUTH_RIGHT = 291
EYE_OUTER_L = 33
EYE_OUTER_R = 263
NOSE_TIP = 1
CHIN = 152

# Ordered contours (closed polygons).
LIPS_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146]
LIPS_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95]
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
# Lower face outline from one cheek to the other, passing under the chin.
JAW = [234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454]
LEFT_EYE = [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246]
RIGHT_EYE = [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]
# Points that do not move when the mouth opens: used to estimate head pose (similarity transforms).
STABLE_POINTS = [33, 133, 263, 362, 168, 6, 197, 195, 5, 4, 1, 98, 327, 234, 454, 127, 356]


class FaceMesh:
    """One face, tracked across consecutive frames (static_image=True detects afresh each call)."""

    def __init__(self, static_image: bool = False):
        self._mesh = _face_mesh_module().FaceMesh(
            static_image_mode=static_image,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=MIN_DETECTION_CONFIDENCE,
            min_tracking_confidence=MIN_TRACKING_CONFIDENCE,
        )

    def detect(self, bgr: np.ndarray) -> np.ndarray | None:
        """(H, W, 3) uint8 BGR -> (478, 2) float32 pixel coordinates, or None when no face is found."""
        import cv2

        h, w = bgr.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = bgr if scale == 1.0 else cv2.resize(bgr, (round(w * scale), round(h * scale)),
                                                    interpolation=cv2.INTER_AREA)
        return self.detect_rgb(cv2.cvtColor(small, cv2.COLOR_BGR2RGB), w, h)

    def detect_rgb(self, rgb: np.ndarray, width: int, height: int) -> np.ndarray | None:
        """Like detect() on an RGB copy of a width x height frame, possibly downscaled (at most DETECT_MAX_SIDE
        on its long side): the caller already converted it (template analysis does that on its decode thread)."""
        res = self._mesh.process(rgb)
        if not res.multi_face_landmarks:
            return None
        pts = _xy(res.multi_face_landmarks[0])
        if pts.shape[0] != N_LANDMARKS:  # refine_landmarks off in some builds: pad the iris points
            pts = np.vstack([pts, np.full((N_LANDMARKS - pts.shape[0], 2), np.nan, np.float32)])
        pts[:, 0] *= width
        pts[:, 1] *= height
        return pts

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> "FaceMesh":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# A NormalizedLandmark as MediaPipe serialises it: field 1 (length 15) holding x, y, z as fixed32 floats (tags 0x0d,
# 0x15, 0x1d); _xy reads the list's bytes with this layout instead of 956 protobuf attribute reads per frame.
_WIRE = np.dtype([("tag", "u1"), ("len", "u1"), ("tx", "u1"), ("x", "<f4"), ("ty", "u1"), ("y", "<f4"),
                  ("tz", "u1"), ("z", "<f4")])
_WIRE_TAGS = (("tag", 0x0A), ("len", 15), ("tx", 0x0D), ("ty", 0x15), ("tz", 0x1D))


def _xy(landmark_list) -> np.ndarray:
    """(n, 2) float32 normalised (x, y) of a NormalizedLandmarkList, the very floats p.x/p.y give (float32 on the
    wire and in the message). Read straight from the serialised bytes: the attribute reads held the GIL for about
    0.17 ms a frame on the tracking threads. Anything laid out otherwise (a field left out, visibility or presence
    set) takes the attribute path."""
    buf = landmark_list.SerializeToString()
    if len(buf) % _WIRE.itemsize == 0:
        rec = np.frombuffer(buf, _WIRE)
        if all((rec[k] == v).all() for k, v in _WIRE_TAGS):
            return np.stack([rec["x"], rec["y"]], axis=1).astype(np.float32)
    return np.array([(p.x, p.y) for p in landmark_list.landmark], dtype=np.float32)


class TrackPool:
    """Tracks one face through a frame sequence with several FaceMesh instances at once. Block b (frames
    b*block .. b*block+block-1) goes to instance b % workers, so every instance tracks runs of consecutive frames:
    measured on three real templates, landmarks differ from a single instance's by 0.05-0.12 px on average and mouth
    jitter is unchanged, while analysis takes about half the time on two cores. At most one block per instance
    waits in memory.

        with TrackPool() as pool:
            for i, rgb in enumerate(frames): pool.submit(i, rgb, width, height)
            landmarks = pool.finish()          # {i: (478, 2) float32 or None}
    """

    def __init__(self, static_image: bool = False, workers: int = TRACK_WORKERS, block: int = TRACK_BLOCK):
        import queue
        import threading

        self.static_image, self.block = static_image, max(1, block)
        self.results: dict[int, np.ndarray | None] = {}
        self._errors: list[BaseException] = []
        self._queues = [queue.Queue(maxsize=self.block) for _ in range(max(1, workers))]
        self._threads = [threading.Thread(target=self._work, args=(q,), daemon=True, name=f"face-track-{k}")
                         for k, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()
        self._closed = False

    def submit(self, i: int, rgb: np.ndarray, width: int, height: int) -> None:
        """Frame i (RGB, possibly downscaled, of a width x height frame); blocks while its instance is a block behind."""
        if self._errors:
            raise self._errors[0]
        self._queues[(i // self.block) % len(self._queues)].put((i, rgb, width, height))

    def finish(self) -> dict[int, np.ndarray | None]:
        """Wait for every submitted frame; re-raises a tracking error."""
        self.close()
        if self._errors:
            raise self._errors[0]
        return self.results

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join()

    def _work(self, q) -> None:
        mesh = None
        try:
            while (item := q.get()) is not None:
                if mesh is None:  # created on its first frame: a short template never loads a second model
                    mesh = FaceMesh(self.static_image)
                i, rgb, w, h = item
                self.results[i] = mesh.detect_rgb(rgb, w, h)
        except BaseException as exc:
            self._errors.append(exc)
            while q.get() is not None:  # keep taking frames so submit() never blocks on a dead instance
                pass
        finally:
            if mesh is not None:
                mesh.close()

    def __enter__(self) -> "TrackPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _face_mesh_module():
    """mediapipe.python.solutions.face_mesh, imported without running the `mediapipe` and `...solutions` package
    __init__ files: those import every solution, the drawing utilities (matplotlib) and the tasks API, about half
    a second per process that a one-shot `heygem-watch process` pays on every run. The two packages are registered
    as bare placeholders; the first attribute asked of one that FaceMesh did not need runs its real __init__ in it,
    so a later `import mediapipe` elsewhere in the process still gets the whole package.

    Serialised: TrackPool's instances start together when their frames come from the cache, and a second thread
    arriving between the two placeholders imported the real `solutions` package under the bare `mediapipe` one
    (ImportError: partially initialized module mediapipe.python.solutions.pose)."""
    with _IMPORT_LOCK:
        return _import_face_mesh()


def _import_face_mesh():
    import importlib
    import importlib.util
    import sys

    name = "mediapipe.python.solutions.face_mesh"
    if name in sys.modules or "mediapipe" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        return importlib.import_module(name)  # raises the usual ImportError
    root = list(spec.submodule_search_locations)[0]
    placeholders = []
    for pkg, folder in (("mediapipe", root), ("mediapipe.python.solutions", os.path.join(root, "python", "solutions"))):
        mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
            pkg, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]))
        mod.__getattr__ = _run_init_on_demand(mod)
        placeholders.append(mod)
    sys.modules["mediapipe"] = placeholders[0]
    importlib.import_module("mediapipe.python")
    sys.modules["mediapipe.python.solutions"] = placeholders[1]
    sys.modules["mediapipe.python"].solutions = placeholders[1]
    return importlib.import_module(name)


def _run_init_on_demand(mod):
    def __getattr__(attr: str):
        if attr.startswith("__") or mod.__dict__.get("_heygem_init_done"):
            raise AttributeError(f"module {mod.__name__!r} has no attribute {attr!r}")
        mod.__dict__["_heygem_init_done"] = True
        mod.__spec__.loader.exec_module(mod)
        return getattr(mod, attr)

    return __getattr__


def inter_ocular(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners, pixels; shape (...,) for landmarks (..., 478, 2)."""
    return np.linalg.norm(landmarks[..., EYE_OUTER_L, :] - landmarks[..., EYE_OUTER_R, :], axis=-1)


def mouth_openness(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over inter-ocular distance (dimensionless), the measure lip-sync judges use."""
    gap = np.linalg.norm(landmarks[..., UPPER_LIP_INNER_MID, :] - landmarks[..., LOWER_LIP_INNER_MID, :], axis=-1)
    return gap / (inter_ocular(landmarks) + 1e-6)


def smooth_landmarks(landmarks: np.ndarray, face_found: np.ndarray, radius: int = 2) -> np.ndarray:
    """Temporal smoothing of a landmark track (n, 478, 2) to remove detector jitter.

    Head pose (stable points) is smoothed with a wider window than the lips so that real mouth motion survives
    while the sub-pixel jitter that makes pasted mouths shimmer does not. Face-less frames stay NaN, and runs are
    smoothed separately so a cut or a lost face does not blend two unrelated positions.
    """
    out = landmarks.copy()
    n = len(landmarks)
    if n < 3:
        return out
    for start, end in found_runs(face_found):
        out[start:end] = _gauss_smooth(landmarks[start:end], sigma=radius / 2.0)
    return out


def found_runs(found: np.ndarray) -> list[tuple[int, int]]:
    """[(start, end), ...] half-open index ranges of consecutive True values: temporal filters run inside each,
    so a cut or a lost face never blends two unrelated positions."""
    f = np.concatenate([[False], np.asarray(found, bool), [False]])
    edges = np.flatnonzero(f[1:] != f[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _gauss_smooth(seg: np.ndarray, sigma: float) -> np.ndarray:
    if len(seg) < 3 or sigma <= 0:
        return seg.copy()
    r = max(1, int(round(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.concatenate([seg[:1].repeat(r, 0), seg, seg[-1:].repeat(r, 0)], axis=0)
    flat = pad.reshape(len(pad), -1)
    res = np.empty((len(seg), flat.shape[1]), np.float64)
    for j, w in enumerate(k):
        if j == 0:
            res[:] = w * flat[j:j + len(seg)]
        else:
            res += w * flat[j:j + len(seg)]
    return res.reshape(seg.shape).astype(np.float32)
