"""engines/builtin/warp.py: exact piecewise-affine maps, and slivers that take no pixel from their neighbours."""
import numpy as np
import pytest

from heygem_watch.engines.builtin import compose, warp


def test_triangle_affines_map_vertices_exactly():
    rng = np.random.default_rng(0)
    dst = rng.uniform(0, 100, (12, 2))
    src = dst + rng.uniform(-5, 5, (12, 2))
    tris = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [0, 0, 1]])  # last one degenerate
    m = warp._tri_affines(dst, src, tris)
    for t, tri in enumerate(tris[:4]):
        got = dst[tri] @ m[t, :, :2].T + m[t, :, 2]
        assert np.allclose(got, src[tri], atol=1e-6)
    assert np.isfinite(m).all()


@pytest.mark.parametrize("step", [1, 2, 3])
def test_piecewise_map_is_identity_when_nothing_moves_and_follows_a_shift(photo, step):
    _, lm = photo
    rig = compose.MouthRig.from_shape(lm)
    pts = np.vstack([lm[compose.MESH_POINTS], rig.box_points(lm)])
    rect = warp.crop_rect(rig.box_points(lm), 512, 600)
    label = warp.mesh_labels(pts, rig.tris, rect, step)
    assert (label < len(rig.tris)).mean() > 0.5  # the mesh covers most of the crop
    mx, my = warp.piecewise_map(warp.affine_table(pts, pts, rig.tris), label, rect, step)
    x0, y0, w, h = rect
    assert mx.shape == (h, w)
    xs, ys = np.meshgrid(np.arange(x0, x0 + w), np.arange(y0, y0 + h))
    assert np.abs(mx - xs).max() < 1e-3 and np.abs(my - ys).max() < 1e-3
    moved = pts + (0.0, 3.0)
    mx, my = warp.piecewise_map(warp.affine_table(pts, moved, rig.tris), label, rect, step)
    core = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))  # well inside the mesh
    assert np.allclose(my[core] - ys[core], 3.0, atol=1e-3) and np.allclose(mx[core], xs[core], atol=1e-3)


@pytest.mark.parametrize("step", [1, 3])
def test_piecewise_map_equals_the_per_sample_affine_of_its_label(photo, step):
    # piecewise_map gathers coefficient planes in place (speed): it must give the plain formula's float32 values
    _, lm = photo
    rig = compose.MouthRig.from_shape(lm)
    dst = np.vstack([lm[compose.MESH_POINTS], rig.box_points(lm)])
    src = dst + np.random.default_rng(1).normal(0, 2, dst.shape)
    rect = warp.crop_rect(rig.box_points(lm), 512, 600)
    label = warp.mesh_labels(dst, rig.tris, rect, step)
    table = warp.affine_table(dst, src, rig.tris)
    xs, ys, _, _ = warp.grid(rect, step)
    c = table[:, label]
    want = (warp.upsample(c[0] * xs + c[1] * ys + c[2], rect, step), warp.upsample(c[3] * xs + c[4] * ys + c[5], rect,
                                                                                step))
    got = warp.piecewise_map(table, label, rect, step)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_a_sliver_triangle_takes_no_pixel_its_neighbours_cover():
    # a 10-pixel square split along its diagonal, plus a sliver (0.2 px high) lying on its bottom edge
    dst = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0], [5.0, 10.2]])
    tris = np.array([[0, 1, 2], [0, 2, 3], [3, 2, 4]])
    for order in (tris, tris[::-1]):
        label = warp.mesh_labels(dst, order, (0, 0, 12, 12), 1)
        sliver = int(np.flatnonzero((order == 4).any(1))[0])
        # the square's edge row (y = 10) is its triangles' as much as the sliver's: it stays theirs
        assert not (label[:11, :11] == sliver).any()
