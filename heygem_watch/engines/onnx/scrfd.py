"""SCRFD face detector (the insightface ONNX family: scrfd_*_bnkps.onnx, det_10g.onnx) on onnxruntime.

Optional: used by the ONNX engine for face boxes when the user puts such a file in the model dir; no weights ship.

    image (H, W, 3) uint8 BGR -> letterbox into the model's input (top-left, aspect kept, zero padding
    bottom/right), RGB, (pixel - 127.5) / 128 -> (1, 3, IH, IW) float32 -> per stride s in 8/16/32 and anchor a:
    score (N, 1), box distances (N, 4) and optionally 5 key points (N, 10), all in stride units from the anchor
    centre (x*s, y*s); N = (IH/s) * (IW/s) * anchors, rows ordered y, x, anchor. Outputs come as all scores, then
    all boxes, then all key points (6 or 9 outputs), each with or without a leading batch axis of 1. The layout
    is checked at load time against the model's declared shapes and the real ones from one run on a black image,
    so another detector is refused by name instead of misread.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

import cv2
import numpy as np

from heygem_watch.config import DETECTOR_PATTERNS

STRIDES = (8, 16, 32)
DEFAULT_INPUT = (640, 640)  # (width, height) when the model's input size is dynamic
PIXEL_MEAN, PIXEL_STD = 127.5, 128.0
SCORE_THRESHOLD = 0.5
NMS_IOU = 0.4
CENTRE_WEIGHT = 0.5  # main face: area x (1 - this x centre distance / half diagonal)
ROW_WIDTHS = (1, 4, 10)  # last axis of the score, box and key-point outputs


def _fits(dim, want: int) -> bool:
    """A declared dimension matches `want`, or is symbolic (a name or None)."""
    return dim == want or not isinstance(dim, int)


class ScrfdError(ValueError):
    """A detector file that cannot be used; the message names the file."""


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """(H, W, 3) uint8 BGR -> ((1, 3, IH, IW) float32 RGB blob, (sx, sy) input pixels per image pixel).

    The image is scaled to fit (aspect kept) into the top-left corner; the rest is black (blob -127.5/128)."""
    iw, ih = size
    h, w = image.shape[:2]
    if h / w > ih / iw:
        nh, nw = ih, max(1, int(ih * w / h))
    else:
        nw, nh = iw, max(1, int(iw * h / w))
    canvas = np.zeros((ih, iw, 3), np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh))
    blob = (canvas[:, :, ::-1].astype(np.float32) - PIXEL_MEAN) * (1.0 / PIXEL_STD)
    return np.ascontiguousarray(blob.transpose(2, 0, 1)[None]), (nw / w, nh / h)


def anchor_centres(size: tuple[int, int], stride: int, anchors: int) -> np.ndarray:
    """(rows, 2) float32 anchor centres (x, y) in input pixels for one stride, in the model's row order."""
    gh, gw = size[1] // stride, size[0] // stride
    ys, xs = np.mgrid[:gh, :gw]
    xy = np.stack([xs, ys], -1).reshape(-1, 1, 2) * stride
    return np.repeat(xy, anchors, 1).reshape(-1, 2).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Greedy non-maximum suppression: (n, 4) x1y1x2y2, (n,) -> indices kept, best score first."""
    order = np.argsort(-scores, kind="stable")
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        ix1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        iy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        ix2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        iy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        order = rest[inter / np.maximum(area[i] + area[rest] - inter, 1e-9) <= iou]
    return np.array(keep, np.int64)


def main_face(boxes: np.ndarray, width: int, height: int) -> int:
    """Index of the face to follow among (n >= 1, 4) boxes: the largest, ties broken towards the frame centre."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = 0.5 * (boxes[:, :2] + boxes[:, 2:]) - (width / 2, height / 2)
    dist = np.hypot(centre[:, 0], centre[:, 1]) / (0.5 * np.hypot(width, height))
    return int(np.argmax(area * (1 - CENTRE_WEIGHT * np.clip(dist, 0, 1))))


def find_detectors(directory: Path, exclude: Path | None = None) -> list[Path]:
    """Files in `directory` named like an insightface detector (DETECTOR_PATTERNS, any case), sorted by name."""
    try:
        files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    except OSError:
        return []
    skip = Path(exclude).resolve() if exclude else None
    return [p for p in files if any(fnmatch.fnmatch(p.name.lower(), pat) for pat in DETECTOR_PATTERNS)
            and p.resolve() != skip]


class Scrfd:
    """One SCRFD model, loaded once. detect() per frame; thread-safe as onnxruntime sessions are."""

    def __init__(self, path: Path, providers=("CPUExecutionProvider",), threads: int = 0):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ScrfdError(f"{self.path}: face detector file not found")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ScrfdError(f"{self.path}: onnxruntime cannot load the face detector ({first})") from None
        self._check_inputs()
        self._check_outputs()

    def _fail(self, why: str) -> ScrfdError:
        return ScrfdError(f"{self.path}: not an SCRFD face detector of the insightface layout ({why}); "
                          "expected one input (1, 3, H, W) and 6 or 9 outputs: scores (N, 1) for strides 8/16/32, "
                          "then boxes (N, 4), then optionally key points (N, 10)")

    def _check_inputs(self) -> None:
        ins = self.session.get_inputs()
        if len(ins) != 1 or len(ins[0].shape) != 4 or "float" not in ins[0].type:
            raise self._fail(f"inputs {[(i.name, i.shape, i.type) for i in ins]}")
        b, c, h, w = ins[0].shape
        if not (_fits(b, 1) and _fits(c, 3)):
            raise self._fail(f"input shape {ins[0].shape}")
        self.input_name = ins[0].name
        self.size = (w, h) if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 else DEFAULT_INPUT
        if self.size[0] % STRIDES[-1] or self.size[1] % STRIDES[-1]:
            raise self._fail(f"input size {self.size} is not a multiple of {STRIDES[-1]}")

    def _check_outputs(self) -> None:
        """Declared shapes first (where the file states them), then the real ones from one run on a black image."""
        outs = self.session.get_outputs()
        if len(outs) not in (6, 9):
            raise self._fail(f"{len(outs)} outputs {[list(o.shape or []) for o in outs]}")
        self.has_kps = len(outs) == 9
        self.output_names = [o.name for o in outs]
        declared = [list(o.shape) if o.shape else None for o in outs]  # None: rank unknown to onnxruntime
        blob = np.zeros((1, 3, self.size[1], self.size[0]), np.float32)
        try:
            real = [list(np.shape(o)) for o in self.session.run(self.output_names, {self.input_name: blob})]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"a {self.size[0]}x{self.size[1]} input does not run: {str(exc)[:200]}") from None
        for shapes in (declared, real):
            for i, shape in enumerate(shapes):
                if shape is None:
                    continue
                want = ROW_WIDTHS[i // 3]
                if len(shape) not in (2, 3) or not _fits(shape[-1], want) or len(shape) == 3 and not _fits(shape[0], 1):
                    raise self._fail(f"output {i} ({outs[i].name}) has shape {shape}, want (N, {want})")
        self.anchors = self._check_rows([shape[-2] for shape in real])
        self.centres = [anchor_centres(self.size, s, a) for s, a in zip(STRIDES, self.anchors)]

    def _check_rows(self, rows: list[int]) -> tuple[int, ...]:
        """Anchors per location for each stride, from the row counts; the same for scores, boxes and key points."""
        anchors = []
        for k, s in enumerate(STRIDES):
            cells = (self.size[0] // s) * (self.size[1] // s)
            per = [rows[g * 3 + k] for g in range(len(rows) // 3)]
            if len(set(per)) != 1 or per[0] % cells or not per[0]:
                raise self._fail(f"stride {s} outputs have {per} rows for a {self.size[0]}x{self.size[1]} "
                                 f"input ({cells} locations)")
            anchors.append(per[0] // cells)
        return tuple(anchors)

    def detect(self, image: np.ndarray, threshold: float = SCORE_THRESHOLD,
               iou: float = NMS_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(H, W, 3) uint8 BGR -> boxes (n, 4) float32 x1y1x2y2, scores (n,), key points (n, 5, 2) or None.

        Pixel coordinates of the given image (not clipped), best score first, after NMS."""
        blob, (sx, sy) = letterbox(image, self.size)
        outs = [np.asarray(o, np.float32) for o in self.session.run(self.output_names, {self.input_name: blob})]
        outs = [o.reshape(-1, ROW_WIDTHS[i // 3]) for i, o in enumerate(outs)]
        boxes, scores, kps = [], [], []
        for k, s in enumerate(STRIDES):
            score = outs[k][:, 0]
            hit = np.flatnonzero(score >= threshold)
            if not len(hit):
                continue
            c = self.centres[k][hit]
            d = outs[3 + k][hit] * s
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))
            scores.append(score[hit])
            if self.has_kps:
                kps.append(np.tile(c, 5).reshape(-1, 5, 2) + outs[6 + k][hit].reshape(-1, 5, 2) * s)
        if not boxes:
            none = np.zeros((0, 5, 2), np.float32) if self.has_kps else None
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), none
        b, sc = np.concatenate(boxes), np.concatenate(scores)
        keep = nms(b, sc, iou)
        scale = np.array([sx, sy], np.float32)
        b = (b[keep].reshape(-1, 2, 2) / scale).reshape(-1, 4)
        kp = np.concatenate(kps)[keep] / scale if self.has_kps else None
        return b.astype(np.float32), sc[keep], kp

    def face_box(self, image: np.ndarray) -> np.ndarray | None:
        """The main face's box (4,) float32 x1y1x2y2 in image pixels, clipped to the image, or None (no face)."""
        boxes, _, _ = self.detect(image)
        if not len(boxes):
            return None
        h, w = image.shape[:2]
        box = boxes[main_face(boxes, w, h)]
        return np.clip(box, 0, [w, h, w, h]).astype(np.float32)
