"""Where the model looks and where its output goes: per template frame a face box, the 96x96 crop fed to the
model, and the feathered paste of its output back into the frame.

    template_boxes  landmark boxes (MediaPipe track) or SCRFD boxes (cached per template and detector file),
                    padded and smoothed by the weights' conventions (wav2lip.py)
    crop_input      frame + box -> the model's face input (masked lower half + reference)
    paste           model output -> frame, through paste_mask, colour-matched along the seam
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from heygem_watch import face
from heygem_watch.engines.onnx.wav2lip import BOX_PADS, BOX_SMOOTH, FACE_SIZE

MIN_BOX = 24  # pixels; a smaller face box is treated as no face
DETECTOR_CACHE = "scrfd-{}.npz"  # in the template's cache dir, keyed by the detector file's fingerprint
MOUTH = [13, 14]  # inner-lip landmarks: a detector box must contain their mean to be the tracked face
FEATHER = 0.035  # mask feather sigma, face-width units
EDGE_SIGMAS = 2.5  # the hard mask stops this many sigmas inside the box
BROWS = [70, 63, 105, 66, 107, 336, 296, 334, 293, 300]
FOREHEAD = 10
# Pasted region: jaw from mouth level round the chin, and the cheeks beside and just under the nose.
MASK_POINTS = [58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288,
               206, 216, 92, 165, 167, 164, 393, 391, 322, 436, 426]


def template_boxes(template, pads, smooth: int, detector=None, detector_fp: str = "",
                   log=None) -> tuple[np.ndarray, np.ndarray]:
    """Per template frame -> (boxes (n, 4) int32, valid (n,) bool): from the landmark track, or from `detector`
    (an scrfd.Scrfd) when given."""
    if detector is None:
        return face_boxes(template.landmarks, template.face_found, template.width, template.height, pads, smooth)
    raw, found = detector_boxes(template, detector, detector_fp, log)
    boxes, valid = pad_and_smooth(raw, found, template.width, template.height, pads, smooth)
    # the paste mask follows the MediaPipe landmarks: a frame needs them, on the face the detector boxed
    lm = template.landmarks
    mouth = lm[:, MOUTH].mean(1)
    with np.errstate(invalid="ignore"):
        inside = ((mouth >= boxes[:, :2]) & (mouth <= boxes[:, 2:])).all(1)
    valid &= template.face_found & np.isfinite(lm[:, MASK_POINTS]).all(axis=(1, 2)) & inside
    return boxes, valid


def detector_boxes(template, detector, detector_fp: str, log) -> tuple[np.ndarray, np.ndarray]:
    """SCRFD main-face box per template frame -> (raw (n, 4) float64 x1y1x2y2 pixels, found (n,) bool).

    Computed once per template and detector file, then read from template.cache_dir."""
    n = template.n_frames
    cache = Path(template.cache_dir) / DETECTOR_CACHE.format(detector_fp)
    try:
        with np.load(cache) as z:
            if int(z["n_frames"]) == n and str(z["template"]) == template.fingerprint:
                return z["boxes"].astype(np.float64), z["found"].astype(bool)
    except (OSError, KeyError, ValueError):
        pass
    t0 = time.monotonic()
    raw, found = np.zeros((n, 4), np.float32), np.zeros(n, bool)
    for k in range(n):
        box = detector.face_box(template.frame(k))
        if box is not None:
            raw[k], found[k] = box, True
    tmp = cache.with_name(f"{cache.stem}.tmp{os.getpid()}.{threading.get_ident()}.npz")
    try:
        np.savez(tmp, boxes=raw, found=found, n_frames=n, template=template.fingerprint,
                 detector=detector.path.name)
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only cache only costs the detection next time
        tmp.unlink(missing_ok=True)
        log.warning("face_boxes_not_cached", cache=str(cache), error=str(exc))
    log.info("face_boxes_detected", face_tracker="scrfd", template=template.name, frames=n,
                  found=int(found.sum()), seconds=round(time.monotonic() - t0, 2))
    return raw.astype(np.float64), found


def face_boxes(landmarks: np.ndarray, found: np.ndarray, width: int, height: int, pads=BOX_PADS,
               smooth: int = BOX_SMOOTH) -> tuple[np.ndarray, np.ndarray]:
    """Detector-style face boxes from a (n, 478, 2) landmark track -> (boxes (n, 4) int32, valid (n,) bool).

    Box: face-oval width, from midway between brows and forehead top down to the chin (an S3FD-like box, what
    the weights were trained on), then padded and smoothed by pad_and_smooth."""
    n = len(landmarks)
    raw = np.zeros((n, 4), np.float64)
    found = np.asarray(found, bool) & np.isfinite(landmarks[:, face.FACE_OVAL]).all(axis=(1, 2))
    if found.any():
        lm = landmarks[found].astype(np.float64)
        oval = lm[:, face.FACE_OVAL]
        top = 0.5 * (lm[:, BROWS, 1].min(1) + lm[:, FOREHEAD, 1])
        raw[found] = np.stack([oval[:, :, 0].min(1), top, oval[:, :, 0].max(1), lm[:, face.CHIN, 1]], 1)
    return pad_and_smooth(raw, found, width, height, pads, smooth)


def pad_and_smooth(raw: np.ndarray, found: np.ndarray, width: int, height: int, pads=BOX_PADS,
                   smooth: int = BOX_SMOOTH) -> tuple[np.ndarray, np.ndarray]:
    """Raw (n, 4) x1y1x2y2 pixel boxes (any tracker) -> (boxes (n, 4) int32, valid (n,) bool): padded (top, bottom,
    left, right), averaged over `smooth` frames (centred, within runs of frames with a face so a cut never blends
    two positions), rounded and clipped to the frame; boxes under MIN_BOX pixels count as no face."""
    found = np.asarray(found, bool)
    raw = np.where(found[:, None], np.asarray(raw, np.float64), 0.0)
    pt, pb, pl, pr = pads
    raw += np.array([-pl, -pt, pr, pb], np.float64)
    out = raw.copy()
    r = smooth // 2
    for start, end in face.found_runs(found):  # mean over the window, inside each run of found frames
        seg = raw[start:end]
        c = np.vstack([np.zeros((1, 4)), np.cumsum(seg, 0)])
        idx = np.arange(len(seg))
        lo, hi = np.maximum(idx - r, 0), np.minimum(idx + r + 1, len(seg))
        out[start:end] = (c[hi] - c[lo]) / (hi - lo)[:, None]
    boxes = np.round(out).astype(np.int64)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    valid = found & (boxes[:, 2] - boxes[:, 0] >= MIN_BOX) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX)
    return boxes.astype(np.int32), valid


def crop_input(image: np.ndarray, box) -> np.ndarray:
    """(H, W, 3) uint8 BGR frame + box -> (6, 96, 96) float32: masked crop (rows 48..95 zero) + reference crop."""
    x1, y1, x2, y2 = box
    crop = cv2.resize(image[y1:y2, x1:x2], (FACE_SIZE, FACE_SIZE))
    ref = crop.astype(np.float32).transpose(2, 0, 1) * (1 / 255.0)
    masked = ref.copy()
    masked[:, FACE_SIZE // 2:] = 0
    return np.concatenate([masked, ref], 0)


def paste_mask(lm: np.ndarray, box) -> np.ndarray:
    """Soft mask (h, w) float32 over the box: mouth, chin and jaw below the nose, feathered, zero at the box edge.

    Convex hull of the lower jaw line (mouth level round the chin) and the cheek points beside and under the
    nose: a rounded region with no straight edge. Kept 2.5 sigma inside the box, so after the Gaussian it is
    below 1% at every box edge and no seam can show."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    sigma = max(1.0, FEATHER * w)
    hard = np.zeros((h, w), np.float32)
    hull = cv2.convexHull(np.round((lm[MASK_POINTS] - (x1, y1)) * 16).astype(np.int32))
    cv2.fillConvexPoly(hard, hull, 1.0, lineType=cv2.LINE_AA, shift=4)
    e = int(np.ceil(EDGE_SIGMAS * sigma))
    hard[:e], hard[h - e:], hard[:, :e], hard[:, w - e:] = 0, 0, 0, 0
    return cv2.GaussianBlur(hard, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)


def paste(image: np.ndarray, box, pred: np.ndarray, lm: np.ndarray) -> None:
    """Blend the model's (96, 96, 3) float BGR [0, 1] output into image (in place) through paste_mask.

    Colour matching: the mean BGR difference between frame and prediction along the feathered seam (weights
    m*(1-m)) shifts the prediction, so lighting and white balance follow the frame; shape is untouched."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    m = paste_mask(lm, box)
    if not m.any():
        return
    gen = cv2.resize(pred, (w, h), interpolation=cv2.INTER_LINEAR) * 255.0
    region = image[y1:y2, x1:x2]
    seam = (m * (1 - m)).reshape(-1)
    s = float(seam.sum())
    if s > 1e-3:  # a weighted mean as one matrix-vector product (numpy's axis sums are slow on these shapes)
        gen += seam @ (region.reshape(-1, 3).astype(np.float32) - gen.reshape(-1, 3)) / s
    gen8 = (np.clip(gen, 0, 255) + 0.5).astype(np.uint8)
    image[y1:y2, x1:x2] = cv2.blendLinear(gen8, np.ascontiguousarray(region), m, 1 - m)

