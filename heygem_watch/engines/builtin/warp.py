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


def dst_inverse(dst: np.ndarray, tris: np.ndarray) -> tuple:
    """The part of _tri_affines that depends on dst only (a frame's maps share dst): first vertices, the inverse of
    each triangle's edge matrix, and which triangles are not degenerate."""
    d0 = dst[tris[:, 0]]
    e1, e2 = dst[tris[:, 1]] - d0, dst[tris[:, 2]] - d0
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    ok = np.abs(det) > 1e-6
    inv_det = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    # inverse of [e1 e2] (columns), then A = [f1 f2] @ inv
    i00, i01 = e2[:, 1] * inv_det, -e2[:, 0] * inv_det
    i10, i11 = -e1[:, 1] * inv_det, e1[:, 0] * inv_det
    return d0, (i00[:, None], i01[:, None], i10[:, None], i11[:, None]), ok


def _tri_affines(dst: np.ndarray, src: np.ndarray, tris: np.ndarray, inv: tuple | None = None) -> np.ndarray:
    """Per triangle, the affine (t, 2, 3) taking dst vertices onto src vertices (degenerate ones: a translation).
    inv: dst_inverse(dst, tris), when already computed."""
    d0, (i00, i01, i10, i11), ok = dst_inverse(dst, tris) if inv is None else inv
    s0 = src[tris[:, 0]]
    f1, f2 = src[tris[:, 1]] - s0, src[tris[:, 2]] - s0
    m = np.empty((len(tris), 2, 3))
    m[:, :, 0] = f1 * i00 + f2 * i10
    m[:, :, 1] = f1 * i01 + f2 * i11
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


def draw_order(dst: np.ndarray, tris: np.ndarray) -> tuple:
    """What mesh_labels needs of dst whatever the rect: the triangles in drawing order (by area) and their
    bounding boxes (pixels); computed once for a frame's several label maps."""
    # Every triangle also paints the pixels its edges touch, and the last one drawn wins them: drawn largest last,
    # a sliver (the gap between shut lips, a fraction of a pixel high) keeps none of its neighbours' pixels, where
    # it would otherwise paint a staircase line of whatever it maps to (the dark mouth interior)
    a, b, c = dst[tris[:, 0]], dst[tris[:, 1]], dst[tris[:, 2]]
    area = np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))
    order = np.argsort(area, kind="stable")
    a, b, c = a[order], b[order], c[order]
    return order, np.minimum(np.minimum(a, b), c), np.maximum(np.maximum(a, b), c)


def mesh_labels(dst: np.ndarray, tris: np.ndarray, rect: tuple[int, int, int, int], step: int = 1,
                order: tuple | None = None) -> np.ndarray:
    """(ch, cw) on the coarse grid of rect: index of the triangle (drawn at dst) covering each sample, len(tris)
    outside the mesh. uint8 while the indices fit (the mouth mesh has about 200 triangles): the triangles are
    drawn into a quarter of the memory and piecewise_map gathers with cv2.LUT; int32 for larger meshes.
    order: draw_order(dst, tris), when already computed."""
    xs, ys, cw, ch = grid(rect, step)
    label = np.full((ch, cw), len(tris), np.uint8 if len(tris) < 256 else np.int32)
    ox, oy = float(xs[0, 0]), float(ys[0, 0])
    pts = np.round((dst - (ox, oy)) / step * 16).astype(np.int32)  # 1/16 grid units
    order, lo, hi = draw_order(dst, tris) if order is None else order
    # only triangles that reach into the grid (a small rect, e.g. around the lips, needs a few of them); one whose
    # box lies more than a sample outside paints nothing there, so the margin need not be tight
    near = ((hi[:, 0] >= ox - 2 * step) & (lo[:, 0] <= ox + step * (cw + 1))
            & (hi[:, 1] >= oy - 2 * step) & (lo[:, 1] <= oy + step * (ch + 1)))
    order = order[near]
    # ~200 calls a frame: positional arguments and polygons taken from one gathered array cost less per call
    fill, line8 = cv2.fillConvexPoly, cv2.LINE_8
    for t, poly in zip(order.tolist(), pts[tris[order]]):
        fill(label, poly, t, line8, 4)
    return label


def affine_table(dst: np.ndarray, src: np.ndarray, tris: np.ndarray, inv: tuple | None = None) -> np.ndarray:
    """(6, t + 1) float32 coefficients of each triangle's affine (dst -> src), coefficient-major so one row is one
    coefficient for every triangle; the last column is the identity (label len(tris): outside the mesh). A frame
    reuses it for its coarse and per-pixel maps with the same points. inv: dst_inverse(dst, tris), shared by the
    tables of one dst."""
    table = np.zeros((6, len(tris) + 1), np.float32)
    table[:, :-1] = _tri_affines(dst, src, tris, inv).reshape(-1, 6).T
    table[:, -1] = (1, 0, 0, 0, 1, 0)
    return table


def piecewise_map(table: np.ndarray, label: np.ndarray, rect, step: int = 1, rows: tuple | None = None) -> tuple:
    """Backward map for cv2.remap over rect=(x0, y0, w, h): pixel p (inside the mesh drawn at dst, as labelled)
    samples the source at the piecewise-affine image of p; outside the mesh the map is the identity. Computed on
    the coarse grid and upsampled: the map is continuous and piecewise linear, so bilinear upsampling is exact
    inside triangles and off by a fraction of a pixel at their edges. table: affine_table(dst, src, tris), label:
    mesh_labels(dst, tris, rect, step). rows: (r0, r1), only those rows of rect (maps (r1 - r0, w)), the same
    values as those rows of the whole map."""
    xs, ys, _, _ = grid(rect, step)
    sliced = rows is not None and step & (step - 1) == 0
    if sliced:
        # Only the coarse rows these rows interpolate from, one more each side so cv2.resize never clamps at the
        # cut: each output row is then the same blend of the same two rows as in the whole map. Power-of-two
        # steps only: resize's row weights are then exact, the same for row I of the cut as for row I + step * k0
        # of the whole (with a step of 3 they differ in the last bit)
        def src_row(big_row: int) -> int:  # the upper coarse row resize blends into this upsampled row
            return (2 * big_row + 1 - step) // (2 * step)

        k0, k1 = rows
        if step > 1:
            k0 = max(0, src_row(rows[0] + step) - 1)
            k1 = min(label.shape[0], src_row(rows[1] - 1 + step) + 3)
        label, ys = label[k0:k1], ys[k0:k1]
    # One coefficient plane at a time, in place: a (6, h, w) gather and its temporaries cost twice as much. The
    # float32 operations and their order are those of c0 * x + c1 * y + c2 (the same map to the bit); labels are
    # always within the table, so take() need not check them
    tmp = np.empty(label.shape, np.float32)
    if label.dtype == np.uint8:  # a gather of exact copies either way
        luts = np.zeros((6, 256), np.float32)
        luts[:, :table.shape[1]] = table

        def gather(r: int, out=None) -> np.ndarray:
            return cv2.LUT(label, luts[r], dst=out)
    else:
        def gather(r: int, out=None) -> np.ndarray:
            return np.take(table[r], label, out=out, mode="clip")

    def plane(r0: int) -> np.ndarray:
        out = gather(r0)
        out *= xs
        gather(r0 + 1, tmp)
        np.multiply(tmp, ys, out=tmp)
        np.add(out, tmp, out=out)
        gather(r0 + 2, tmp)
        np.add(out, tmp, out=out)
        return out

    mx, my = plane(0), plane(3)
    if not sliced:
        mx, my = upsample(mx, rect, step), upsample(my, rect, step)
        return (mx, my) if rows is None else (mx[rows[0]:rows[1]], my[rows[0]:rows[1]])
    if step == 1:
        return mx, my
    r0, w = rows[0] + step - step * k0, rect[2]  # (upsample's rows and columns, less the rows cut off above)
    return tuple(cv2.resize(m, (m.shape[1] * step, m.shape[0] * step), interpolation=cv2.INTER_LINEAR)
                 [r0:r0 + rows[1] - rows[0], step:step + w] for m in (mx, my))


def exact_within(mx: np.ndarray, my: np.ndarray, map_rect, box, dst: np.ndarray, tris: np.ndarray,
                 table: np.ndarray, labels: dict | None = None, order: tuple | None = None,
                 label_rect=None) -> None:
    """Overwrite (in place) the part of a map over map_rect (x0, y0, w, h) that lies in box with the exact
    per-pixel piecewise map (step 1). labels: a dict shared by calls with the same dst and tris (a frame's two
    maps), so the per-pixel triangle labels are drawn once; table: affine_table(dst, src, tris); order:
    draw_order(dst, tris), when already computed. label_rect: a rect holding map_rect whose part in box the labels
    are drawn over (default map_rect). cv2 fills a triangle cut by the image edge a little differently from one
    inside it, so labels drawn over another rect may differ at such edges: a map over part of an earlier map's
    rect takes the same labels as the whole would."""
    def within(r) -> tuple:
        x0, y0 = max(r[0], box[0]), max(r[1], box[1])
        x1, y1 = min(r[0] + r[2], box[0] + box[2]), min(r[1] + r[3], box[1] + box[3])
        return int(x0), int(y0), int(x1 - x0), int(y1 - y0)

    sub, drawn = within(map_rect), within(map_rect if label_rect is None else label_rect)
    if sub[2] < 1 or sub[3] < 1:
        return
    label = None if labels is None else labels.get(drawn)
    if label is None:
        label = mesh_labels(dst, tris, drawn, 1, order)
        if labels is not None:
            labels[drawn] = label
    label = label[sub[1] - drawn[1]:sub[1] - drawn[1] + sub[3], sub[0] - drawn[0]:sub[0] - drawn[0] + sub[2]]
    ex, ey = piecewise_map(table, label, sub, 1)
    win = (slice(sub[1] - map_rect[1], sub[1] + sub[3] - map_rect[1]),
           slice(sub[0] - map_rect[0], sub[0] + sub[2] - map_rect[0]))
    mx[win], my[win] = ex, ey


def crop_rect(points: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer (x0, y0, w, h) covering points, clipped to the frame."""
    x0, y0 = np.floor(points.min(0)).astype(int) - 2
    x1, y1 = np.ceil(points.max(0)).astype(int) + 3
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(width, x1), min(height, y1)
    return int(x0), int(y0), int(max(0, x1 - x0)), int(max(0, y1 - y0))
