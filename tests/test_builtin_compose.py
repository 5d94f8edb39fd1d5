"""engines/builtin/compose.py: a mask with no hard edge, and a drawn mouth that FaceMesh reads as open/shut (shut cleanly)."""
import numpy as np

from heygem_watch import face
from heygem_watch.engines.builtin import compose


def _measure(img):
    with face.FaceMesh(static_image=True) as mesh:
        lm = mesh.detect(img)
    assert lm is not None, "the rendered face must still be a face"
    return float(face.mouth_openness(lm))


def test_mask_has_no_hard_edge(photo):
    _, lm = photo
    outer = lm[face.LIPS_OUTER]
    iod = float(face.inter_ocular(lm))
    rect = compose.crop_rect(np.vstack([outer - 0.5 * iod, outer + 0.5 * iod]), 512, 600)
    for step in (1, 2):
        m = compose.feathered_mask(outer, outer.mean(0), iod, rect, step=step)
        assert m.max() > 0.99 and m.min() >= 0.0
        # zero at the crop border, full in the lips, and never a jump between neighbouring pixels
        assert max(m[0].max(), m[-1].max(), m[:, 0].max(), m[:, -1].max()) < 0.01
        jump = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
        assert jump < 0.08, jump
        c = np.round(lm[14] - rect[:2]).astype(int)
        assert m[c[1], c[0]] > 0.99


def test_drawn_mouth_opens_and_shuts_as_asked_and_stays_local(photo):
    img, lm = photo
    rig = compose.MouthRig.from_shape(lm)
    base = _measure(img)
    out_open = img.copy()
    compose.compose_mouth(out_open, lm, out_open, lm, rig, 0.16, None, np.zeros(3))
    out_shut = img.copy()
    compose.compose_mouth(out_shut, lm, out_shut, lm, rig, 0.0, None, np.zeros(3))
    o_open, o_shut = _measure(out_open), _measure(out_shut)
    assert o_open > base + 0.06 and o_open > 0.09
    assert o_shut < 0.03
    # only the lower face changed: the eyes and the top of the picture are untouched
    eye_row = int(lm[face.EYE_OUTER_L, 1])
    assert np.array_equal(out_open[:eye_row], img[:eye_row])
    diff = np.abs(out_open.astype(int) - img).sum(2) > 0
    ys, xs = np.nonzero(diff)
    iod = face.inter_ocular(lm)
    assert np.abs(xs - lm[14, 0]).max() < 1.2 * iod and np.abs(ys - lm[14, 1]).max() < 1.2 * iod


def test_source_mouth_from_another_frame_is_aligned_and_colour_matched(photo):
    img, lm = photo
    rig = compose.MouthRig.from_shape(lm)
    # the "source" frame: the same face, shifted and a little darker (another moment of the template)
    shift = np.float32([[1, 0, 9], [0, 1, -6]])
    import cv2

    src = cv2.warpAffine(img, shift, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REPLICATE)
    src = np.clip(src.astype(int) - 25, 0, 255).astype(np.uint8)
    src_lm = lm + (9, -6)
    gap = float(face.mouth_openness(lm))
    out = img.copy()
    compose.compose_mouth(out, lm, lambda r: _crop(src, r), src_lm, rig, gap, None, np.zeros(3))
    # aligned and re-lit: the result is close to the original picture (the source's darkening is undone)
    c = np.round(lm[14]).astype(int)
    win = (slice(c[1] - 30, c[1] + 30), slice(c[0] - 40, c[0] + 40))
    assert np.abs(out[win].astype(int) - img[win]).mean() < 8.0
    assert np.abs(src[win].astype(int) - img[win]).mean() > 20.0


def _crop(img, rect):
    x0, y0, w, h = rect
    pad = 64
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return big[y0 + pad:y0 + pad + h, x0 + pad:x0 + pad + w].copy()


def _dark_fraction(img, lm):
    """Fraction of the pixels inside the outer lip line as dark as a mouth interior (luma < 45)."""
    import cv2

    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(lm[face.LIPS_OUTER]).astype(np.int32)], 1)
    luma = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[mask > 0]
    return float((luma < 45).mean())


def test_a_wide_open_mouth_shuts_with_no_interior_left_between_the_lips(photo):
    import cv2

    img, _ = photo
    # twice the size: maps are planned on a coarser grid there (work_step 2), where the lips' meeting line used to
    # be interpolated through the interior
    img = cv2.resize(img, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    with face.FaceMesh(static_image=True) as mesh:
        lm = mesh.detect(img).astype(np.float64)
        opened = img.copy()
        compose.compose_mouth(opened, lm, opened, lm, compose.MouthRig.from_shape(lm), 0.25, None, np.zeros(3))
        lm_open = mesh.detect(opened).astype(np.float64)  # a photo whose mouth starts wide open
        assert face.mouth_openness(lm_open) > 0.2
        shut = opened.copy()
        compose.compose_mouth(shut, lm_open, shut, lm_open, compose.MouthRig.from_shape(lm_open), 0.0, None,
                              np.zeros(3))
        lm_shut = mesh.detect(shut).astype(np.float64)
    assert face.mouth_openness(lm_shut) < 0.02
    # no more of the dark interior shows along the lips than in the person's own shut mouth
    assert _dark_fraction(shut, lm_shut) <= _dark_fraction(img, lm)


def _teeth_rows(img, lm):
    """Rows of teeth (bright, nearly grey) in a 7-pixel column through the middle of the mouth."""
    import cv2

    x = int(round(0.5 * (lm[13, 0] + lm[14, 0])))
    yuv = cv2.cvtColor(img, cv2.COLOR_BGR2YUV).astype(int)[int(lm[13, 1]) - 4:int(lm[14, 1]) + 4, x - 3:x + 4]
    teeth = (yuv[..., 0] > 150) & (np.abs(yuv[..., 1] - 128) + np.abs(yuv[..., 2] - 128) < 30)
    return int(teeth.any(1).sum())


def test_a_mouth_drawn_narrower_than_its_source_hides_its_teeth_instead_of_squeezing_them(photo):
    import cv2

    img = cv2.resize(photo[0], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    with face.FaceMesh(static_image=True) as mesh:
        lm = mesh.detect(img).astype(np.float64)
        compose.compose_mouth(img, lm, img, lm, compose.MouthRig.from_shape(lm), 0.25, None, np.zeros(3))
        wide = mesh.detect(img).astype(np.float64)  # wide open, upper teeth showing under the upper lip
        teeth = _teeth_rows(img, wide)
        assert teeth >= 4
        for gap in (0.06, 0.1):
            out = img.copy()
            compose.compose_mouth(out, wide, out, wide, compose.MouthRig.from_shape(wide), gap, None, np.zeros(3))
            lm_out = mesh.detect(out).astype(np.float64)
            assert abs(face.mouth_openness(lm_out) - gap) < 0.03
            # the teeth keep their height under the upper lip (the lower lip covers the rest), not squashed flat
            assert _teeth_rows(out, lm_out) >= 0.7 * teeth


def test_a_mouth_drawn_wider_than_its_source_gains_no_black_corners(photo):
    # a source frame whose open mouth shows its tongue (no dark interior at all), drawn a little less open and
    # wider (a wanted width): its inner corners used to fill with hard-edged black diamonds of synthetic cavity
    import cv2

    img, lm = photo
    with face.FaceMesh(static_image=True) as mesh:
        opened = img.copy()
        compose.compose_mouth(opened, lm, opened, lm, compose.MouthRig.from_shape(lm), 0.25, None, np.zeros(3))
        lm_open = mesh.detect(opened).astype(np.float64)
        inside = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(inside, [np.round(lm_open[face.LIPS_INNER]).astype(np.int32)], 1)
        src = opened.copy()
        src[cv2.dilate(inside, np.ones((3, 3), np.uint8)) > 0] = (110, 105, 185)  # the tongue, pink
        gap = float(face.mouth_openness(lm_open))
        width = float(np.linalg.norm(lm_open[291] - lm_open[61]) / face.inter_ocular(lm_open))
        out = img.copy()
        compose.compose_mouth(out, lm, lambda r: _crop(src, r), lm_open, compose.MouthRig.from_shape(lm), gap - 0.03,
                              1.12 * width, np.zeros(3))
        lm_out = mesh.detect(out).astype(np.float64)
    assert face.mouth_openness(lm_out) > 0.15
    mouth = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(mouth, [np.round(lm_out[face.LIPS_INNER]).astype(np.int32)], 1)
    luma = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)[mouth > 0]
    assert (luma < 60).sum() <= 3, int((luma < 60).sum())  # the source's darkest mouth pixel is far brighter


def test_nonzero_box_bounds_what_the_mask_reaches():
    m = np.zeros((40, 50), np.float32)
    assert compose._nonzero_box(m) == (0, 40, 0, 50)  # nothing: all of it (the source is read as before)
    m[7, 11] = 1e-30
    m[20:31, 30:33] = 0.5
    assert compose._nonzero_box(m) == (7, 31, 11, 33)
