"""engines/builtin/compose.py: exact piecewise warps, a mask with no hard edge, and a drawn mouth that FaceMesh reads as open/shut."""
import numpy as np
import pytest

from heygem_watch import face
from heygem_watch.engines.builtin import compose
from tests import mediagen


@pytest.fixture(scope="module")
def photo():
    img = mediagen.face_photo()
    with face.FaceMesh(static_image=True) as mesh:
        lm = mesh.detect(img)
    assert lm is not None
    return img, lm.astype(np.float64)


def _measure(img):
    with face.FaceMesh(static_image=True) as mesh:
        lm = mesh.detect(img)
    assert lm is not None, "the rendered face must still be a face"
    return float(face.mouth_openness(lm))


def test_triangle_affines_map_vertices_exactly():
    rng = np.random.default_rng(0)
    dst = rng.uniform(0, 100, (12, 2))
    src = dst + rng.uniform(-5, 5, (12, 2))
    tris = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [0, 0, 1]])  # last one degenerate
    m = compose._tri_affines(dst, src, tris)
    for t, tri in enumerate(tris[:4]):
        got = dst[tri] @ m[t, :, :2].T + m[t, :, 2]
        assert np.allclose(got, src[tri], atol=1e-6)
    assert np.isfinite(m).all()


@pytest.mark.parametrize("step", [1, 2, 3])
def test_piecewise_map_is_identity_when_nothing_moves_and_follows_a_shift(photo, step):
    _, lm = photo
    rig = compose.MouthRig.from_shape(lm)
    pts = np.vstack([lm[compose.MESH_POINTS], rig.box_points(lm)])
    rect = compose.crop_rect(rig.box_points(lm), 512, 600)
    label = compose.mesh_labels(pts, rig.tris, rect, step)
    assert (label < len(rig.tris)).mean() > 0.5  # the mesh covers most of the crop
    mx, my = compose.piecewise_map(pts, pts, rig.tris, label, rect, step)
    x0, y0, w, h = rect
    assert mx.shape == (h, w)
    xs, ys = np.meshgrid(np.arange(x0, x0 + w), np.arange(y0, y0 + h))
    assert np.abs(mx - xs).max() < 1e-3 and np.abs(my - ys).max() < 1e-3
    moved = pts + (0.0, 3.0)
    mx, my = compose.piecewise_map(pts, moved, rig.tris, label, rect, step)
    core = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))  # well inside the mesh
    assert np.allclose(my[core] - ys[core], 3.0, atol=1e-3) and np.allclose(mx[core], xs[core], atol=1e-3)


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
