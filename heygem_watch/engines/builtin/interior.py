"""The mouth interior for the built-in engine: what shows between the lips when the drawn mouth opens wider or
shuts further than the template frame it comes from.

    cavity(...)          a synthetic interior (dark cavity, tongue, upper teeth) where the source never opened
    split_interior(...)  the source's own interior re-attached to the drawn lips (its teeth stay with their lip)
    seal_lips(px, open)  where to sample lips that must meet: from just inside each lip, not the interior's edge
"""
from __future__ import annotations

import cv2
import numpy as np

from heygem_watch import face
from heygem_watch.engines.builtin.mouth import (DEFAULT_TEETH_BGR, LOWER_INNER, LOWER_OUTER, UPPER_INNER, UPPER_OUTER,
                                                head_frame)
from heygem_watch.engines.builtin.warp import grid, upsample

CAVITY_BGR = (28, 22, 52)  # mouth interior (dark, reddish), scaled by the local brightness
TONGUE_BGR = (70, 72, 150)  # the tongue at the bottom of a wide-open mouth, scaled likewise
TEETH_HEIGHT = 0.035  # visible upper-teeth height at full opening (iod units)
SEAL_INSET = 0.03  # closing a mouth: lip pixels are taken from this far inside each lip (iod units) ...
SEAL_FRACTION = 0.6  # ... at most this fraction of the lip's thickness ...
SEAL_RAMP = 0.04  # ... in full once the mouth closes by this much (iod units) or more ...
SEAL_OPEN = 0.03  # ... and only for drawn openings below this (iod units), in full when shut
SEAM_BAND = 0.02  # where sealed lips meet, a band this wide (iod units) ...
SEAM_SOFT_PX = 0.8  # ... is blurred this much (Gaussian sigma, pixels): no staircase edge
SEAM_ROWS_PAD = 8  # rows of context for that blur: more than its kernel's radius (3 at sigma 0.8)
JOIN_BRIDGE_PX = 1.0  # each half of the source interior reaches this far past the source's middle (pixels) ...
JOIN_RAMP_PX = 1.5  # ... and a new gap beyond both reaches turns to cavity over this distance (pixels)
JOIN_BAND = 0.05  # where the halves overlap they are cross-faded over at most this much (iod units)
MIN_CORNER_SPAN = 0.05  # inner corners closer than this (iod units) cannot be matched drawn to source


def cavity(rect, head, inner: np.ndarray, open_px: float, iod: float, light: float, teeth_bgr,
           step: int = 1, teeth_scale: float = 1.0) -> tuple:
    """Synthetic mouth interior over rect: (image (h, w, 3) float32, alpha (h, w) float32).

    Inside the inner-lip polygon: a dark cavity, darker at the back and towards the corners, a dim tongue at the
    bottom; upper teeth hang from the upper lip (height grows with the opening, shaded at their lower edge and
    towards the corners, faint gaps between them)."""
    xs, ys, cw, ch = grid(rect, step)
    origin, rot, _ = head
    u, v = _head_uv(xs, ys, origin, rot, iod)
    up = _lip_line(inner, LIPS_INNER_UPPER, origin, rot, iod)
    v_up = np.interp(u, up[:, 0], up[:, 1])
    v_lo = np.interp(u, *_lip_line(inner, LIPS_INNER_LOWER, origin, rot, iod).T)
    half = max(1e-3, 0.5 * (up[-1, 0] - up[0, 0]))
    gap = open_px / iod
    lateral = np.clip(1.0 - (u / half) ** 2, 0.0, 1.0)
    span = np.maximum(v_lo - v_up, 1e-3)
    depth = np.clip((v - v_up) / span, 0.0, 1.0)  # 0 at the upper lip, 1 at the lower lip
    dark = np.array(CAVITY_BGR, np.float32) * light
    tongue = np.array(TONGUE_BGR, np.float32) * light
    shade = (0.5 + 0.5 * np.sqrt(lateral))[..., None]
    tw = np.clip((depth - 0.55) / 0.45, 0.0, 1.0)[..., None] * min(1.0, gap / 0.12)
    img = (dark * (1 - tw) + tongue * tw) * shade
    teeth = np.asarray(teeth_bgr, np.float32)
    if not teeth.max() > 0:  # the template never showed teeth: off-white, a touch of the skin's hue, its light
        teeth = np.array(DEFAULT_TEETH_BGR, np.float32) * float(np.clip(light * 1.05, 0.55, 1.1))
    # upper teeth: a band under the upper lip, its lower edge a gentle arc, shaded towards the corners
    th = min(TEETH_HEIGHT, 0.33 * gap) * np.sqrt(lateral) * teeth_scale
    band = np.clip(((v_up + th) - v) * iod / max(1.2, 0.6 * step), 0.0, 1.0) * (v > v_up - 0.03) * (th > 0.004)
    gaps = 1.0 - 0.12 * np.exp(-((np.abs(u) % 0.075 - 0.0375) / 0.006) ** 2 / 2) * (np.abs(u) > 0.03)
    rel = np.clip((v - v_up) / np.maximum(th, 1e-3), 0, 1)  # 0 under the lip .. 1 at the biting edge
    tshade = ((0.6 + 0.4 * lateral) * (0.82 + 0.18 * np.sin(np.pi * np.clip(rel * 1.3, 0, 1))))[..., None]
    img = img * (1 - band[..., None]) + teeth * tshade * gaps[..., None] * band[..., None]
    a = np.zeros((ch, cw), np.float32)
    pts = np.round((inner - (xs[0, 0], ys[0, 0])) / step * 16).astype(np.int32)
    cv2.fillPoly(a, [pts], 1.0, lineType=cv2.LINE_AA, shift=4)
    a = cv2.GaussianBlur(a, (0, 0), max(0.5, 0.006 * iod / step))
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), max(0.5, 0.004 * iod / step))
    return upsample(img, rect, step), upsample(a, rect, step)


# positions of the upper / lower inner lip (corner to corner) within face.LIPS_INNER
LIPS_INNER_UPPER = [face.LIPS_INNER.index(k) for k in [78] + UPPER_INNER + [308]]
LIPS_INNER_LOWER = [face.LIPS_INNER.index(k) for k in [78] + LOWER_INNER + [308]]
_CORNER_L, _CORNER_R = face.LIPS_INNER.index(78), face.LIPS_INNER.index(308)


def _head_uv(xs, ys, origin, rot, iod: float) -> tuple:
    """Pixel positions -> head-frame (u, v) in iod units (see mouth.head_frame)."""
    u = ((xs - origin[0]) * rot[0, 0] + (ys - origin[1]) * rot[0, 1]) / iod
    v = ((xs - origin[0]) * rot[1, 0] + (ys - origin[1]) * rot[1, 1]) / iod
    return u, v


def _lip_line(pts: np.ndarray, sel, origin, rot, iod: float) -> np.ndarray:
    """(k, 2) head-frame (u, v) of the lip points pts[sel], ordered by u: the lip as a curve v(u) for np.interp."""
    q = (pts[sel] - origin) @ rot.T / iod
    return q[np.argsort(q[:, 0])]


def _corners_u(pts: np.ndarray, origin, rot, iod: float) -> tuple[float, float]:
    """Head-frame u (iod units) of the two inner mouth corners (78, 308) of an inner-lip contour in LIPS_INNER order."""
    q = (pts[[_CORNER_L, _CORNER_R]] - origin) @ rot.T / iod
    return float(q[0, 0]), float(q[1, 0])


def split_interior(rect, head, inner: np.ndarray, src_inner: np.ndarray, to_src: np.ndarray, src_img):
    """The source's mouth interior re-attached to the drawn lips over rect: (image (h, w, 3) float32, alpha).

    inner: drawn inner-lip contour, src_inner: the source's inner-lip contour mapped into this frame (both in
    face.LIPS_INNER order, pixels); to_src: 2x3 affine from this frame to source pixels; src_img: array or
    callable (x0, y0, w, h) -> crop. A pixel within half the source's gap of the drawn upper lip shows what lay
    that far below the source's upper lip (its upper teeth), likewise from the lower lip, at the same place
    between the inner corners (drawn corner to source corner, whatever the drawn width); alpha is 0 in the new
    gap between the two, where the caller paints the cavity (a gap under 2 * JOIN_BRIDGE_PX is bridged instead), and
    where the halves overlap (a mouth drawn less open) they are cross-faded."""
    x0, y0, w, h = rect
    origin, rot, iod = head
    # a row and a column of positions, broadcast by the first sum: the same float32 values as full grids, less work
    xs, ys = np.arange(x0, x0 + w, dtype=np.float32)[None, :], np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    u, v = _head_uv(xs, ys, origin, rot, iod)

    def curve(pts, sel, at):
        return np.interp(at, *_lip_line(pts, sel, origin, rot, iod).T)

    # The drawn mouth is rarely exactly as wide as the source's (a wanted width, lips moved to a new opening), so
    # its inner corners are matched to the source's: read at the same u, a drawn corner reaching past the source's
    # lies where the source's lips are shut (half gap 0), no lip claims it, and the cavity's darkest shade fills
    # it with a hard-edged black diamond
    ct, cs = _corners_u(inner, origin, rot, iod), _corners_u(src_inner, origin, rot, iod)
    us = u
    if min(ct[1] - ct[0], cs[1] - cs[0]) > MIN_CORNER_SPAN:  # (a collapsed contour: read at the same u)
        us = cs[0] + (u - ct[0]) * ((cs[1] - cs[0]) / (ct[1] - ct[0]))
    up_t, lo_t = curve(inner, LIPS_INNER_UPPER, u), curve(inner, LIPS_INNER_LOWER, u)
    up_s, lo_s = curve(src_inner, LIPS_INNER_UPPER, us), curve(src_inner, LIPS_INNER_LOWER, us)
    half = 0.5 * np.maximum(lo_s - up_s, 0.0)
    # each half reaches a little past the source's middle (never past its other lip): a drawn gap barely wider
    # than the source's is bridged by both halves instead of leaving a one-pixel strip of cavity, a dark line
    # across the teeth; a wider new gap fades its cavity in over JOIN_RAMP_PX rather than appearing at full
    # strength. In pixels: the line is a matter of resolution, a gap of a few pixels on a large face is a real one
    reach = half + np.minimum(JOIN_BRIDGE_PX / iod, half)
    du, dl = v - up_t, lo_t - v
    a, b = reach - du, reach - dl  # >= 0: within the upper / lower half's reach
    # where the two reaches overlap (a mouth drawn less open than its source) the halves are cross-faded over up
    # to JOIN_BAND just above the upper half's limit: the source's strip between them is left out, and a hard cut
    # would put e.g. its dark middle straight against its tongue; the upper teeth above the band stay untouched
    band = np.clip(2.0 * reach - (lo_t - up_t), 1e-6, JOIN_BAND)
    t = np.clip((du - (reach - band)) / band, 0.0, 1.0)
    w_lo = np.where(a < 0, 1.0, np.where(b < 0, 0.0, t * t * (3.0 - 2.0 * t)))
    vs_up = (up_s + np.minimum(du, reach)).astype(np.float32)
    vs_lo = (lo_s - np.minimum(dl, reach)).astype(np.float32)
    maps = []
    for vs in (vs_up, vs_lo):
        px = origin[0] + iod * (us * rot[0, 0] + vs * rot[1, 0])
        py = origin[1] + iod * (us * rot[0, 1] + vs * rot[1, 1])
        maps.append(((to_src[0, 0] * px + to_src[0, 1] * py + to_src[0, 2]).astype(np.float32),
                     (to_src[1, 0] * px + to_src[1, 1] * py + to_src[1, 2]).astype(np.float32)))
    if callable(src_img):
        sx0 = max(0, int(min(m[0].min() for m in maps)) - 2) & ~1
        sy0 = max(0, int(min(m[1].min() for m in maps)) - 2) & ~1
        sx1, sy1 = int(max(m[0].max() for m in maps)) + 3, int(max(m[1].max() for m in maps)) + 3
        crop = src_img((sx0, sy0, sx1 - sx0, sy1 - sy0))
        maps = [(mx - sx0, my - sy0) for mx, my in maps]
    else:
        crop = src_img
    up_img, lo_img = (cv2.remap(crop, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT).astype(np.float32)
                      for mx, my in maps)
    mix = w_lo.astype(np.float32)
    mix = cv2.merge([mix, mix, mix])  # not mix[..., None]: numpy broadcasts that 3 values at a time, 10x slower
    img = up_img + (lo_img - up_img) * mix
    alpha = np.clip(1.0 + np.maximum(a, b) * (iod / JOIN_RAMP_PX), 0.0, 1.0).astype(np.float32)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.6, 0.005 * iod))
    return img, alpha


def seal_amount(gap: float, open_t: float) -> float:
    """0..1: how far lips of a face with inner gap `gap` drawn at open_t (both iod) are sealed. Only lips that
    (nearly) meet: an opening keeps its real edges, or it would look narrower than drawn."""
    # (plain floats: called four times a frame, and np.clip on a scalar costs microseconds each)
    return _clip01((gap - max(open_t, 0.0)) / SEAL_RAMP) * _clip01(1.0 - open_t / SEAL_OPEN)


def _clip01(x: float) -> float:
    return float(min(max(x, 0.0), 1.0))


def soften_seam(img: np.ndarray, rect, line: np.ndarray, iod: float, amount: float) -> None:
    """Anti-alias where sealed lips meet, in place: img (h, w, 3) float32 over rect (x0, y0, w, h); line: the drawn
    inner lip from corner to corner (k, 2 pixels). The sealed map jumps from one lip to the other between two pixel
    rows, a hard staircase edge where the rest of the mouth is soft; a narrow band along it is blurred a little."""
    x0, y0 = rect[0], rect[1]
    band = np.zeros(img.shape[:2], np.float32)
    pts = np.round((line - (x0, y0)) * 16).astype(np.int32)
    cv2.polylines(band, [pts], False, 1.0, thickness=max(1, int(round(SEAM_BAND * iod))), lineType=cv2.LINE_AA,
                  shift=4)
    band = cv2.GaussianBlur(band, (0, 0), 1.0) * amount
    # Only the rows the band reaches change (elsewhere it is exactly 0): the blur is taken over those rows and
    # SEAM_ROWS_PAD more each side (beyond its kernel's reach), whole rows so each pixel is filtered as in the full
    # image (the same values to the bit), the rest of the mouth rect is left alone
    rows = np.flatnonzero(band.any(1))
    if len(rows) == 0:
        return
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    p0, p1 = max(0, r0 - SEAM_ROWS_PAD), min(img.shape[0], r1 + SEAM_ROWS_PAD)
    soft = cv2.GaussianBlur(img[p0:p1], (0, 0), SEAM_SOFT_PX)[r0 - p0:r1 - p0]
    part = img[r0:r1]
    part += (soft - part) * band[r0:r1, :, None]


def seal_lips(px: np.ndarray, open_t: float) -> np.ndarray:
    """Where to sample the lips of a face (478, 2 pixels) whose mouth is drawn narrower than it is (open_t, iod):
    its inner-lip points moved into the lips (up the upper lip, down the lower one, the inner corners towards the
    outer ones, by SEAL_INSET, at most SEAL_FRACTION of the lip's thickness). The real lip edge wanders between
    the landmarks, and the dark interior just inside it would be squeezed into a jagged black seam where the lips
    meet; sampled from a little inside each lip, they meet cleanly (losing that sliver of their inner edge)."""
    origin, rot, iod = head_frame(px)
    k = seal_amount(float(np.linalg.norm(px[13] - px[14])) / iod, open_t)
    if k <= 0.0:
        return px
    out = px.copy()
    down = rot[1]  # the head's downward axis, pixels per unit
    for inner, outer, sign in ((UPPER_INNER, UPPER_OUTER, -1.0), (LOWER_INNER, LOWER_OUTER, 1.0)):
        thick = np.abs((px[outer] - px[inner]) @ down)
        step = np.minimum(SEAL_INSET * k * iod, SEAL_FRACTION * thick)
        out[inner] = px[inner] + sign * step[:, None] * down[None, :]
    # the interior reaches into the inner corners: they are sampled further out, towards the outer corners
    for ci, co in ((78, 61), (308, 291)):
        d = px[co] - px[ci]
        n = float(np.hypot(*d)) + 1e-9
        out[ci] = px[ci] + d / n * min(SEAL_INSET * k * iod, SEAL_FRACTION * n)
    return out
