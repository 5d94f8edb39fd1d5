"""Compositing for the built-in engine: landmark-driven warps (warp.py), colour matching, feathered masks, the mouth
interior (interior.py).

All work happens in a crop around the lower face (a few hundred pixels on a side whatever the frame size):
  rig = MouthRig.from_shape(landmarks)             mesh over the lower face (once per template)
  t = rig.target_shape(src_lm -> cur frame, open, width)   where lips/jaw must be in the current frame
  crop = compose_mouth(cur_img, cur_lm, src_img, src_lm, t, ...)   paste, blend, fill the mouth interior
The current frame is warped so its own lips, jaw and chin move (no double chin: one continuous warp of the lower
face, nothing pasted on the jaw line); lips, teeth and mouth interior come from the selected template frame,
warped onto the same shape and blended through a feathered mask around the lips with no hard edge (reaching a
little lower when this frame's own mouth was open wider, so no trace of its lower lip is left). Where the target
mouth is more open than the source frame's, the interior is filled with a shaded cavity and upper teeth (still
photos, silent presenters). Where it must be more shut than the source's (a photo taken mid-word), the upper lip
comes down a little and the lips cover part of the source's interior (cropped, not squeezed: no flattened teeth);
shut, both lips are sampled from just inside their edges (interior.seal_lips) and the meeting line is mapped per
pixel: no strip of the interior is left between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from heygem_watch import face
from heygem_watch.engines.builtin.interior import (LIPS_INNER_UPPER, SEAL_OPEN, cavity, seal_amount, seal_lips,
                                                   soften_seam, split_interior)
from heygem_watch.engines.builtin.mouth import (CORNERS, LOWER_INNER, LOWER_OUTER, UPPER_INNER, UPPER_OUTER, apply_affine,
                                                head_frame, similarity)
from heygem_watch.engines.builtin.warp import (affine_table, crop_rect, delaunay, draw_order, dst_inverse, exact_within,
                                               grid, mesh_labels, piecewise_map, upsample)

# Mesh points: lips, jaw line, chin and cheeks below the nose (MediaPipe indices); the upper ones are anchors.
CHEEK_CHIN = [18, 200, 199, 175, 57, 287, 212, 432, 202, 422, 204, 424, 210, 430, 83, 313, 201, 421]
ANCHORS = [2, 98, 327, 164, 167, 393, 206, 426, 205, 425, 36, 266, 123, 352, 50, 280]
MESH_POINTS = list(dict.fromkeys(face.LIPS_OUTER + face.LIPS_INNER + face.JAW + CHEEK_CHIN + ANCHORS))
BOX_PAD = 0.18  # crop box margin around the mesh, inter-ocular units
MIN_GAP = 0.004  # closest the inner lips come in a "closed" mouth (iod units): keeps the mesh from folding
LIP_HALF = 0.30  # lower-lip drop falls to zero this far from the mouth centre (iod units)
JAW_SPREAD = 0.6  # lateral fall-off of the jaw drop (iod units): wide, so the chin outline keeps its shape
JAW_FOLLOW = 0.7  # the chin drops this much of the lip opening
JAW_RAMP = 0.3  # shortest lip-to-chin distance the lip-to-jaw blend is spread over (iod units)
UPPER_LIFT = 0.12  # the upper lip rises this much of the opening
UPPER_CLOSE = 0.3  # ...and comes down this much of a closing (a wide-open lip relaxes as the jaw comes up)
MASK_MARGIN = 0.07  # the pasted mouth extends this far beyond the outer lip line (iod units)
MASK_SOFT = 0.045  # Gaussian feather of the mouth mask (sigma, iod units)
CROP_FROM = 0.02  # a mouth drawn this much narrower than its source (iod units) shows a cropped interior
GHOST_COVER = 0.5  # the mask reaches this fraction of (this frame's opening - the drawn one) further down
STATS_SAMPLES = 48  # colour statistics use about this many pixels across the mouth
MIN_IOD_PX = 8.0  # faces smaller than this (eye to eye, pixels) are left alone
WORK_IOD = 64  # maps and masks are planned on a grid this many pixels per inter-ocular distance (speed)

# Positions within MESH_POINTS, looked up once here rather than on every frame
_IDX = np.array(MESH_POINTS)
_POS = {k: i for i, k in enumerate(MESH_POINTS)}
I13, I14, I61, I291, ICHIN = _POS[13], _POS[14], _POS[61], _POS[291], _POS[face.CHIN]
I_UPPER_INNER = np.array([_POS[k] for k in UPPER_INNER])
I_LOWER_INNER = np.array([_POS[k] for k in LOWER_INNER])
I_UPPER_OUTER = np.array([_POS[k] for k in UPPER_OUTER])
I_LOWER_OUTER = np.array([_POS[k] for k in LOWER_OUTER])
I_LIPS_OUTER = np.array([_POS[k] for k in face.LIPS_OUTER])
I_LIPS_INNER = np.array([_POS[k] for k in face.LIPS_INNER])
IS_LIPS = np.isin(_IDX, face.LIPS_OUTER + face.LIPS_INNER)
IS_ANCHOR = np.isin(_IDX, ANCHORS)
IS_LOWER_LIP = np.isin(_IDX, LOWER_INNER + LOWER_OUTER)
IS_UPPER_LIP = np.isin(_IDX, UPPER_INNER + UPPER_OUTER)
IS_CORNER = np.isin(_IDX, CORNERS)


@dataclass
class MouthRig:
    """Triangle mesh (indices into MESH_POINTS + 8 box points) built once on a template's typical face."""

    tris: np.ndarray  # (t, 3) int
    box: np.ndarray  # (8, 2) head-normalised box points

    @classmethod
    def from_shape(cls, lm: np.ndarray) -> "MouthRig":
        origin, rot, iod = head_frame(lm)
        p = (lm[MESH_POINTS] - origin) @ rot.T / iod
        # triangulate with the mouth held open so inner-lip triangles span the gap and never fold when it closes
        p = p.copy()
        lower = IS_LOWER_LIP | ((p[:, 1] > 0.02) & ~IS_CORNER)
        p[lower, 1] += 0.12
        lo, hi = p.min(0) - BOX_PAD, p.max(0) + BOX_PAD
        mid = 0.5 * (lo + hi)
        box = np.array([[lo[0], lo[1]], [mid[0], lo[1]], [hi[0], lo[1]], [hi[0], mid[1]], [hi[0], hi[1]],
                        [mid[0], hi[1]], [lo[0], hi[1]], [lo[0], mid[1]]])
        return cls(delaunay(np.vstack([p, box])), box)

    def box_points(self, lm: np.ndarray, head: tuple | None = None) -> np.ndarray:
        """The 8 fixed box points in the pixel frame of a face with landmarks lm (head: head_frame(lm), if known)."""
        origin, rot, iod = head_frame(lm) if head is None else head
        return self.box * iod @ rot + origin

    def target_shape(self, cur_lm: np.ndarray, src_aligned: np.ndarray, open_t: float, width_t: float | None,
                     open_weight: float = 1.0, head: tuple | None = None) -> np.ndarray:
        """Mesh points (len(MESH_POINTS), 2) where the mouth must be drawn in the current frame.

        cur_lm: current frame landmarks; src_aligned: the source frame's landmarks mapped into the current frame;
        open_t: wanted inner-lip gap, width_t: wanted mouth width (both / iod; width None = keep)."""
        origin, rot, iod = head_frame(cur_lm) if head is None else head
        p = (src_aligned[_IDX] - origin) @ rot.T / iod
        cur = (cur_lm[_IDX] - origin) @ rot.T / iod
        mouth_v = 0.5 * (cur[I13, 1] + cur[I14, 1])
        # above the mouth (nose, cheeks, the jaw line up by the ears) the current frame stays where it is
        anchor = IS_ANCHOR | (~IS_LIPS & (cur[:, 1] < mouth_v - 0.05))
        p[anchor] = cur[anchor]
        gap = p[I14, 1] - p[I13, 1]
        delta = (max(open_t, 0.0) - gap) * open_weight
        u, v = p[:, 0] - 0.5 * (p[I13, 0] + p[I14, 0]), p[:, 1] - 0.5 * (p[I13, 1] + p[I14, 1])
        lip_w = np.clip(1.0 - (u / LIP_HALF) ** 2, 0.0, 1.0)
        below = ~(IS_LOWER_LIP | IS_UPPER_LIP | IS_CORNER | anchor) & (v > 0)
        dv = np.zeros(len(_IDX))
        # lower lip: each point's gap to its upper partner scales when closing (a wide smile shuts everywhere, not
        # only in the middle) and grows by the wanted opening, most in the middle, when opening
        iu, il, io = I_UPPER_INNER, I_LOWER_INNER, I_LOWER_OUTER
        gaps = p[il, 1] - p[iu, 1]
        want = max(open_t, 0.0)
        if want < gap:
            # each point's gap scales by the same ratio; the upper lip takes UPPER_CLOSE of it (with its outer
            # partner, keeping the lip's thickness), so a wide-open lower lip is not bent up into the upper lip's arch
            close = np.maximum(gaps, 0.0) * (1.0 - want / max(gap, 1e-6))
            dv_lip = -(1.0 - UPPER_CLOSE) * close
            dv[iu] = UPPER_CLOSE * close
            dv[I_UPPER_OUTER] = UPPER_CLOSE * close
        else:  # the upper lip takes a small share of the opening
            dv_lip = (1.0 - UPPER_LIFT) * delta * lip_w[il]
            dv[IS_UPPER_LIP] = -UPPER_LIFT * delta * lip_w[IS_UPPER_LIP]
        # the inner lips never cross; the outer lower lip moves exactly as its inner partner (keeps the lip's
        # thickness, so the triangles between them and the corners cannot fold)
        floor = p[iu, 1] + dv[iu] + MIN_GAP * lip_w[il] + 0.5 * MIN_GAP
        # the lower points next to the corners stay below the corners
        for j, corner_in, corner_out in ((0, 78, 61), (-1, 308, 291)):
            c_in, c_out = _POS[corner_in], _POS[corner_out]
            floor[j] = max(floor[j], p[c_in, 1] + MIN_GAP, p[c_out, 1] + MIN_GAP - (p[io[j], 1] - p[il[j], 1]))
        dv_lip = np.maximum(p[il, 1] + dv_lip, floor) - p[il, 1]
        dv[il] = dv_lip
        dv[io] = dv_lip
        # below the lips the skin follows the lower lip near it and the jaw further down (at the chin): a smooth
        # blend, monotonic downwards, so the mesh neither folds when the mouth opens nor when it shuts
        o = np.argsort(p[io, 0])
        lip_v = np.interp(u, u[io][o], v[io][o])
        lip_dv = np.interp(u, u[io][o], dv_lip[o])
        chin_v = v[ICHIN]
        r = np.clip((v - lip_v) / np.maximum(chin_v - lip_v, JAW_RAMP), 0.0, 1.0)
        jaw = delta * JAW_FOLLOW * np.exp(-(u / JAW_SPREAD) ** 2)
        dv[below] = (lip_dv * (1.0 - r) + jaw * r)[below]
        p[:, 1] += dv
        if width_t is not None:
            il, ir = I61, I291
            dw = 0.5 * (width_t - (p[ir, 0] - p[il, 0]))
            for ic, sgn in ((il, -1.0), (ir, 1.0)):
                d2 = (p[:, 0] - p[ic, 0]) ** 2 + (p[:, 1] - p[ic, 1]) ** 2
                p[~anchor, 0] += sgn * dw * np.exp(-d2[~anchor] / 0.15 ** 2)
        # lips never cross: each lower point stays below its upper partner
        for iu, il_, gap_min in ((I_UPPER_INNER, I_LOWER_INNER, MIN_GAP), (I_UPPER_OUTER, I_LOWER_OUTER, 0.03)):
            p[il_, 1] = np.maximum(p[il_, 1], p[iu, 1] + gap_min * lip_w[il_] + 0.5 * MIN_GAP)
        return p * iod @ rot + origin


def feathered_mask(poly: np.ndarray, centre: np.ndarray, iod: float, rect, margin: float = MASK_MARGIN,
                   soft: float = MASK_SOFT, step: int = 1, down: np.ndarray | None = None,
                   extra: float = 0.0) -> np.ndarray:
    """Soft mask (h, w) float32 0..1 for the polygon grown by margin*iod, feathered by a Gaussian of soft*iod:
    1 inside the lips, falling smoothly to 0 (no step anywhere). Drawn on the coarse grid, then upsampled.
    down (unit vector) and extra (iod units): the lower half of the polygon also grows this much downwards."""
    xs, ys, cw, ch = grid(rect, step)
    d = poly - centre
    n = np.linalg.norm(d, axis=1, keepdims=True) + 1e-6
    grown = centre + d + d / n * (margin * iod)
    if down is not None and extra > 0:
        lower = np.clip((d @ down) / (np.abs(d @ down).max() + 1e-6), 0.0, 1.0)[:, None]
        grown = grown + lower * down[None, :] * (extra * iod)
    m = np.zeros((ch, cw), np.float32)
    pts = np.round((grown - (xs[0, 0], ys[0, 0])) / step * 16).astype(np.int32)
    cv2.fillPoly(m, [pts], 1.0, lineType=cv2.LINE_AA, shift=4)
    m = cv2.GaussianBlur(m, (0, 0), max(1.0, soft * iod / step))
    return upsample(m, rect, step)


def _usable(px: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Per-frame landmarks when they are complete and agree with the smoothed ones (within a quarter of the
    inter-ocular distance), else the smoothed ones."""
    px = np.asarray(px, np.float64)
    if px.shape != lm.shape or not np.isfinite(px).all():
        return lm
    if np.abs(px - lm).max() > 0.25 * (face.inter_ocular(lm) + 1e-6):
        return lm
    return px


def _inverse_similarity(a: np.ndarray) -> np.ndarray:
    r = a[:, :2]
    det = r[0, 0] * r[1, 1] - r[0, 1] * r[1, 0]
    ri = np.array([[r[1, 1], -r[0, 1]], [-r[1, 0], r[0, 0]]]) / det
    return np.hstack([ri, (-ri @ a[:, 2])[:, None]])


def _nonzero_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the rows and columns of mask holding anything but 0 (all of it when nothing does)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _per_channel(a: np.ndarray) -> np.ndarray:
    """(h, w) float32 -> (h, w, 3), the same value in each channel. numpy broadcasting a[..., None] against an
    (h, w, 3) image runs its inner loop 3 elements at a time, about 10x slower than the same operation on
    operands of equal shape (0.44 vs 0.04 ms on a 275x212 mouth rect); the arithmetic is unchanged."""
    return cv2.merge([a, a, a])


def _add_per_channel(img: np.ndarray, off: np.ndarray) -> None:
    """img (h, w, 3) += off (3,) in place, as whole rows (see _per_channel: the same float32 sums, faster)."""
    if not img.flags.c_contiguous:  # (a reshape would copy, and the sum would be lost)
        img += off
        return
    rows = img.reshape(img.shape[0], -1)
    rows += np.tile(off.astype(img.dtype, copy=False), img.shape[1])


def work_step(iod: float) -> int:
    """Grid step for maps and masks: faces larger than WORK_IOD pixels between the eyes are planned coarser."""
    return max(1, int(iod // WORK_IOD))


def compose_mouth(cur_img: np.ndarray, cur_lm: np.ndarray, src_img, src_lm: np.ndarray, rig: MouthRig,
                  open_t: float, width_t: float | None, teeth_bgr, fill: float | None = None,
                  cur_px: np.ndarray | None = None, src_px: np.ndarray | None = None) -> np.ndarray:
    """Draw the mouth of the source frame into cur_img (in place) with inner-lip gap open_t and width width_t
    (iod units) and return cur_img. src_img: the source frame, the same object as cur_img for "this frame", or a
    callable (x0, y0, w, h) -> BGR crop (reads only what is needed). fill: how much of the interior to synthesise
    (None: as much as the source frame lacks).
    cur_lm/src_lm (smoothed over time) place the mouth, so it does not shimmer; cur_px/src_px (this frame's own,
    unsmoothed detection, default: the same) say where the lips really are in the pixels being warped: with
    smoothed points there, a fast-opening mouth leaves a ghost of its lower lip below the drawn one."""
    cur_lm, src_lm = cur_lm.astype(np.float64), src_lm.astype(np.float64)
    cur_px = cur_lm if cur_px is None else _usable(cur_px, cur_lm)
    src_px = src_lm if src_px is None else _usable(src_px, src_lm)
    same = src_img is cur_img
    if not (face.inter_ocular(cur_lm) >= MIN_IOD_PX and face.inter_ocular(src_lm) >= MIN_IOD_PX):
        return cur_img  # no usable face geometry (a collapsed or tiny detection): leave the frame as it is
    stable = face.STABLE_POINTS
    a = np.array([[1.0, 0, 0], [0, 1.0, 0]]) if same else similarity(src_lm[stable], cur_lm[stable])
    head = head_frame(cur_lm)  # (once for the frame's several uses)
    target = rig.target_shape(cur_lm, apply_affine(a, src_lm), open_t, width_t, head=head)
    box_cur = rig.box_points(cur_lm, head)
    dst = np.vstack([target, box_cur])
    h_img, w_img = cur_img.shape[:2]
    rect = crop_rect(box_cur, w_img, h_img)
    x0, y0, w, h = rect
    if w < 8 or h < 8:
        return cur_img
    iod = head[2]
    step = work_step(iod)
    outer = target[I_LIPS_OUTER]
    inner = target[I_LIPS_INNER]
    # the mouth rect: where the mask is non-zero (grown outer lips + 3 sigma of feather)
    grow = (MASK_MARGIN + 3 * MASK_SOFT + GHOST_COVER * 0.4) * iod + 2
    mx0, my0 = np.maximum(np.floor(outer.min(0) - grow).astype(int), (x0, y0))
    mx1, my1 = np.minimum(np.ceil(outer.max(0) + grow).astype(int), (x0 + w, y0 + h))
    mrect = (int(mx0), int(my0), int(mx1 - mx0), int(my1 - my0))
    sl = (slice(my0 - y0, my1 - y0), slice(mx0 - x0, mx1 - x0))
    order = draw_order(dst, rig.tris)  # the same for every label map of this frame
    label = mesh_labels(dst, rig.tris, rect, step, order)
    bsrc = np.vstack([seal_lips(cur_px, open_t)[_IDX], box_cur])
    inv = dst_inverse(dst, rig.tris)  # both tables map from dst
    btable = affine_table(dst, bsrc, rig.tris, inv)  # each of the frame's two point pairs: one table for all its maps
    bmx, bmy = piecewise_map(btable, label, rect, step)
    # around the lips' meeting line the map jumps from the upper lip to the lower one: upsampled from a coarse
    # grid it would sample in between (the mouth interior) along a staircase; there it is computed per pixel
    lips_box, exact_labels = None, {}
    if step > 1:
        pad = 2 * step + 2
        lx0, ly0 = np.floor(inner.min(0)).astype(int) - pad
        lx1, ly1 = np.ceil(inner.max(0)).astype(int) + pad
        lips_box = (int(lx0), int(ly0), int(lx1 - lx0), int(ly1 - ly0))
        exact_within(bmx, bmy, rect, lips_box, dst, rig.tris, btable, exact_labels, order)
    bg = cv2.remap(cur_img, bmx, bmy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    bgf = bg[sl].astype(np.float32)
    # where this frame's own mouth was open wider than the drawn one, its lower lip may survive below the drawn
    # lips (landmarks sit high on a wide-open lower lip): the pasted mouth reaches further down there
    cur_gap = float(np.linalg.norm(cur_px[13] - cur_px[14]) / iod)
    extra = GHOST_COVER * max(0.0, cur_gap - open_t)
    mask = feathered_mask(outer, outer.mean(0), iod, mrect, step=step, down=head[1][1], extra=0.0 if same else extra)
    if same:
        fgf = bgf.copy()
    else:
        # The source is drawn only where the mask is not 0, about 60% of the mouth rect: elsewhere the blend keeps
        # bgf to the bit whatever fgf holds (0 there), and the colour statistics weigh it by 0
        fy0, fy1, fx0, fx1 = _nonzero_box(mask)
        frect = (mx0 + fx0, my0 + fy0, fx1 - fx0, fy1 - fy0)
        src_pts = np.vstack([seal_lips(src_px, open_t)[_IDX], apply_affine(_inverse_similarity(a), box_cur)])
        ftable = affine_table(dst, src_pts, rig.tris, inv)
        cols = slice(frect[0] - x0, frect[0] + frect[2] - x0)
        if step == 1:  # only the mouth rect is needed
            fmx, fmy = piecewise_map(ftable, label[frect[1] - y0:frect[1] + frect[3] - y0, cols], frect, 1)
        else:
            fmx, fmy = piecewise_map(ftable, label, rect, step, rows=(frect[1] - y0, frect[1] + frect[3] - y0))
            fmx, fmy = fmx[:, cols], fmy[:, cols]
            exact_within(fmx, fmy, frect, lips_box, dst, rig.tris, ftable, exact_labels, order, label_rect=mrect)
        if callable(src_img):  # read only the source pixels the map touches
            sx0, sy0 = max(0, int(fmx.min()) - 2) & ~1, max(0, int(fmy.min()) - 2) & ~1
            sx1, sy1 = int(fmx.max()) + 3, int(fmy.max()) + 3
            crop = src_img((sx0, sy0, sx1 - sx0, sy1 - sy0))
            fmx -= sx0  # (in place: the maps are this frame's own)
            fmy -= sy0
        else:
            crop = src_img
        fgf = np.zeros(bgf.shape, np.float32)
        fgf[fy0:fy1, fx0:fx1] = cv2.remap(crop, fmx, fmy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    off = np.zeros(3, np.float32)
    if not same:
        # colour matching: the mean difference where the mask fades (skin around the lips) moves the source to
        # the current frame's light
        k = max(1, min(mask.shape) // STATS_SAMPLES)  # statistics on a sparse grid of pixels: same answer, faster
        ring = mask[::k, ::k] * (1.0 - mask[::k, ::k])
        wsum = float(ring.sum())
        if wsum > 1e-3:
            d = bgf[::k, ::k].reshape(-1, 3) - fgf[::k, ::k].reshape(-1, 3)
            d *= _per_channel(ring).reshape(-1, 3)
            # cv2.reduce adds the rows in order, as numpy's sum over axis 0 of (n, 3) does (the same float32 sums),
            # without numpy's inner loop of 3
            off = cv2.reduce(d, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32F).reshape(3) / wsum
            _add_per_channel(fgf, off)
    src_gap = float(np.linalg.norm(src_px[13] - src_px[14]) / (face.inter_ocular(src_px) + 1e-6))
    if fill is None:
        # where the drawn mouth opens wider than the source did; and where it is drawn clearly narrower but not
        # shut, the source's interior is cropped (its teeth hidden behind the lips) rather than squeezed into a
        # white strip (shut lips are sealed instead: fading out towards SEAL_OPEN)
        fill = 1.0 if open_t > src_gap + 0.005 else 0.0
        if open_t < src_gap - CROP_FROM:
            fill = float(np.clip((open_t - 0.5 * SEAL_OPEN) / (0.5 * SEAL_OPEN), 0.0, 1.0))
    if fill > 0.02 and open_t > 0.01:
        # the interior only: its own small rect inside the mouth rect. The source's upper teeth stay with the upper
        # lip and its lower teeth with the lower lip (no stretched teeth); the new gap between them is a cavity.
        ix0, iy0 = np.maximum(np.floor(inner.min(0)).astype(int) - 2, (mx0, my0))
        ix1, iy1 = np.minimum(np.ceil(inner.max(0)).astype(int) + 3, (mx1, my1))
        if ix1 - ix0 > 2 and iy1 - iy0 > 2:
            irect = (int(ix0), int(iy0), int(ix1 - ix0), int(iy1 - iy0))
            isl = (slice(iy0 - my0, iy1 - my0), slice(ix0 - mx0, ix1 - mx0))
            k = max(1, min(mask.shape) // STATS_SAMPLES)
            skin = bgf[::k, ::k][(mask[::k, ::k] > 0.02) & (mask[::k, ::k] < 0.5)]
            light = float(np.clip(skin.mean() / 160.0, 0.35, 1.25)) if len(skin) else 1.0
            own_teeth = float(np.clip(src_gap / 0.04, 0.0, 1.0))  # a source that was open brings its own teeth
            img, alpha = cavity(irect, head, inner, open_t * iod, iod, light, teeth_bgr, step,
                                teeth_scale=1.0 - own_teeth)
            src_inner = apply_affine(a, src_px[face.LIPS_INNER])
            real, ra = split_interior(irect, head, inner, src_inner, _inverse_similarity(a),
                                      cur_img if same else src_img)
            _add_per_channel(real, off)  # the same colour matching as the rest of the source mouth
            ra = _per_channel(ra)
            img = real * ra + img * (1.0 - ra)
            alpha *= fill
            fgf[isl] += (img - fgf[isl]) * _per_channel(alpha)
    # bgf + (fgf - bgf) * mask, in place in fgf (no longer needed): the same float32 operations, no temporaries
    res = fgf
    res -= bgf
    res *= _per_channel(mask)
    res += bgf
    seal = max(seal_amount(cur_gap, open_t), 0.0 if same else seal_amount(src_gap, open_t))
    if seal > 0.0:
        soften_seam(res, mrect, inner[LIPS_INNER_UPPER], iod, seal)
    res += 0.5
    # clipped to 0..255 by two cv2 thresholds, in place: 0.02 ms a mouth rect where np.clip takes 0.08 (the same
    # bytes once truncated: only a -0.0 could come out +0.0, and res holds no NaN)
    cv2.threshold(res, 0, 0, cv2.THRESH_TOZERO, dst=res)
    cv2.threshold(res, 255, 255, cv2.THRESH_TRUNC, dst=res)
    bg[sl] = res.astype(np.uint8)
    cur_img[y0:y0 + h, x0:x0 + w] = bg
    return cur_img
