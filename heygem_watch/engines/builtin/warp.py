"""Piecewise-affine warps for the built-in engine: a triangle mesh drawn at one set of points samples the image at
another (cv2.remap maps), planned on a grid coarser than the pixels where that is exact enough.

    tris = delaunay(points)                                   triangles (t, 3) of a point set
    label = mesh_labels(dst, tris, rect, step)                which triangle covers each grid sample of rect
    table = affine_table(dst, src, tris)                      per-triangle affines dst -> src (one per point pair)
    mx, my = piecewise_map(table, label, rect, step)          backward map over rect for cv2.remap
    exact_within(mx, my, rect, box, dst, tris, table)         the same map per pixel inside box (discontinuities)
"""
from __future__ import annotations

import cv2
import numpy as np

DELAUNAY_SCALE = 4096  # triangulation coordinates span this many units (see delaunay)


def delaunay(pts: np.ndarray) -> np.ndarray:
    """Delaunay triangles (t, 3) int32 of points (n, 2), as vertex indices. OpenCV's Subdiv2D (cv2 is loaded
    anyway; scipy.spatial costs half a second of imports per process); the points are scaled up first because
    Subdiv2D's bounding rectangle is integer, and its float32 vertices are mapped back to the nearest input point."""
    lo = pts.min(0)
    q = ((pts - lo) * DELAUNAY_SCALE / max(float(np.ptp(pts, 0).max()), 1e-9) + 1.0).astype(np.float32)
    sub = cv2.Subdiv2D((0, 0, DELAUNAY_SCALE + 3, DELAUNAY_SCALE + 3))
    sub.insert([(float(x), float(y)) for x, y in q])
    tri = sub.getTriangleList().reshape(-1, 3, 2)
    d = ((tri[:, :, None, :] - q[None, None, :, :]) ** 2).sum(-1)  # (t, 3, n)
    idx = d.argmin(-1).astype(np.int32)
    ok = (d.min(-1) < 1e-3).all(1)  # triangles touching Subdiv2D's virtual outer vertices are dropped
    return idx[ok]


def _tri_affines(dst: np.ndarray, src: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Per triangle, the affine (t, 2, 3) taking dst vertices onto src vertices (degenerate ones: a translation)."""
    d0, s0 = dst[tris[:, 0]], src[tris[:, 0]]
    e1, e2 = dst[tris[:, 1]] - d0, dst[tris[:, 2]] - d0
    f1, f2 = src[tris[:, 1]] - s0, src[tris[:, 2]] - s0
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    ok = np.abs(det) > 1e-6
    inv_det = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    # inverse of [e1 e2] (columns), then A = [f1 f2] @ inv
    i00, i01 = e2[:, 1] * inv_det, -e2[:, 0] * inv_det
    i10, i11 = -e1[:, 1] * inv_det, e1[:, 0] * inv_det
    m = np.empty((len(tris), 2, 3))
    m[:, :, 0] = f1 * i00[:, None] + f2 * i10[:, None]
    m[:, :, 1] = f1 * i01[:, None] + f2 * i11[:, None]
    m[~ok, :, :2] = np.eye(2)
    m[:, :, 2] = s0 - (m[:, :, 0] * d0[:, :1] + m[:, :, 1] * d0[:, 1:])
    return m


def grid(rect, step: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Sample positions (full-frame pixels) of a grid coarser by `step` over rect: xs (1, cw), ys (ch, 1).
    With step > 1 the grid has one extra sample beyond each side, so upsample() interpolates all the way to the
    rect's edges instead of clamping there."""
    x0, y0, w, h = rect
    if step == 1:
        return (np.arange(x0, x0 + w, dtype=np.float32)[None, :], np.arange(y0, y0 + h, dtype=np.float32)[:, None],
                w, h)
    cw, ch = -(-w // step) + 2, -(-h // step) + 2
    off = (step - 1) / 2.0 - step
    xs = (x0 + off + step * np.arange(cw, dtype=np.float32))[None, :]
    ys = (y0 + off + step * np.arange(ch, dtype=np.float32))[:, None]
    return xs, ys, cw, ch


def upsample(a: np.ndarray, rect, step: int) -> np.ndarray:
    """A coarse grid (from _grid) back to rect's full size (bilinear; cv2.resize puts coarse sample j at full
    pixel (j + 0.5) * step - 0.5, which is where _grid took it)."""
    if step == 1:
        return a
    _, _, w, h = rect
    big = cv2.resize(a, (a.shape[1] * step, a.shape[0] * step), interpolation=cv2.INTER_LINEAR)
    return big[step:step + h, step:step + w]


def mesh_labels(dst: np.ndarray, tris: np.ndarray, rect: tuple[int, int, int, int], step: int = 1) -> np.ndarray:
    """(ch, cw) int32 on the coarse grid of rect: index of the triangle (drawn at dst) covering each sample,
    len(tris) outside the mesh."""
    xs, ys, cw, ch = grid(rect, step)
    label = np.full((ch, cw), len(tris), np.int32)
    pts = np.round((dst - (xs[0, 0], ys[0, 0])) / step * 16).astype(np.int32)
    # Every triangle also paints the pixels its edges touch, and the last one drawn wins them: drawn largest last,
    # a sliver (the gap between shut lips, a fraction of a pixel high) keeps none of its neighbours' pixels, where
    # it would otherwise paint a staircase line of whatever it maps to (the dark mouth interior)
    a, b, c = dst[tris[:, 0]], dst[tris[:, 1]], dst[tris[:, 2]]
    area = np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))
    # only triangles that reach into the grid (a small rect, e.g. around the lips, needs a few of them)
    tp = pts[tris]  # (t, 3, 2), 1/16 grid units
    inside = ((tp[..., 0].max(1) >= -16) & (tp[..., 0].min(1) <= cw * 16)
              & (tp[..., 1].max(1) >= -16) & (tp[..., 1].min(1) <= ch * 16))
    order = np.argsort(area, kind="stable")
    for t in order[inside[order]].tolist():
        cv2.fillConvexPoly(label, tp[t], t, lineType=cv2.LINE_8, shift=4)
    return label


def affine_table(dst: np.ndarray, src: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """(6, t + 1) float32 coefficients of each triangle's affine (dst -> src), coefficient-major so one row is one
    coefficient for every triangle; the last column is the identity (label len(tris): outside the mesh). A frame
    reuses it for its coarse and per-pixel maps with the same points."""
    table = np.zeros((6, len(tris) + 1), np.float32)
    table[:, :-1] = _tri_affines(dst, src, tris).reshape(-1, 6).T
    table[:, -1] = (1, 0, 0, 0, 1, 0)
    return table


def piecewise_map(table: np.ndarray, label: np.ndarray, rect, step: int = 1) -> tuple:
    """Backward map for cv2.remap over rect=(x0, y0, w, h): pixel p (inside the mesh drawn at dst, as labelled)
    samples the source at the piecewise-affine image of p; outside the mesh the map is the identity. Computed on
    the coarse grid and upsampled: the map is continuous and piecewise linear, so bilinear upsampling is exact
    inside triangles and off by a fraction of a pixel at their edges. table: affine_table(dst, src, tris), label:
    mesh_labels(dst, tris, rect, step)."""
    xs, ys, _, _ = grid(rect, step)
    # One coefficient plane at a time, in place: a (6, h, w) gather and its temporaries cost twice as much. The
    # float32 operations and their order are those of c0 * x + c1 * y + c2 (the same map to the bit); labels are
    # always within the table, so take() need not check them
    tmp = np.empty(label.shape, np.float32)

    def plane(r0: int) -> np.ndarray:
        out = np.take(table[r0], label, mode="clip")
        out *= xs
        np.take(table[r0 + 1], label, out=tmp, mode="clip")
        np.multiply(tmp, ys, out=tmp)
        np.add(out, tmp, out=out)
        np.take(table[r0 + 2], label, out=tmp, mode="clip")
        np.add(out, tmp, out=out)
        return out

    mx, my = plane(0), plane(3)
    return upsample(mx, rect, step), upsample(my, rect, step)


def exact_within(mx: np.ndarray, my: np.ndarray, map_rect, box, dst: np.ndarray, tris: np.ndarray,
                 table: np.ndarray, labels: dict | None = None) -> None:
    """Overwrite (in place) the part of a map over map_rect (x0, y0, w, h) that lies in box with the exact
    per-pixel piecewise map (step 1). labels: a dict shared by calls with the same dst and tris (a frame's two
    maps), so the per-pixel triangle labels are drawn once; table: affine_table(dst, src, tris)."""
    x0, y0 = max(map_rect[0], box[0]), max(map_rect[1], box[1])
    x1 = min(map_rect[0] + map_rect[2], box[0] + box[2])
    y1 = min(map_rect[1] + map_rect[3], box[1] + box[3])
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    sub = (int(x0), int(y0), int(x1 - x0), int(y1 - y0))
    label = None if labels is None else labels.get(sub)
    if label is None:
        label = mesh_labels(dst, tris, sub, 1)
        if labels is not None:
            labels[sub] = label
    ex, ey = piecewise_map(table, label, sub, 1)
    win = (slice(sub[1] - map_rect[1], y1 - map_rect[1]), slice(sub[0] - map_rect[0], x1 - map_rect[0]))
    mx[win], my[win] = ex, ey


def crop_rect(points: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer (x0, y0, w, h) covering points, clipped to the frame."""
    x0, y0 = np.floor(points.min(0)).astype(int) - 2
    x1, y1 = np.ceil(points.max(0)).astype(int) + 3
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(width, x1), min(height, y1)
    return int(x0), int(y0), int(max(0, x1 - x0)), int(max(0, y1 - y0))
