"""engines/builtin/warp.py: exact piecewise-affine maps, and slivers that take no pixel from their neighbours."""
import numpy as np
import pytest

from heygem_watch import face
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
    rig, rect, label, table = _mouth_mesh(photo, 1, step)
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


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_piecewise_map_rows_are_those_rows_of_the_whole_map(photo, step):
    # compose asks only for the mouth's rows of the source map: they must be the whole map's values to the bit
    rig, rect, label, table = _mouth_mesh(photo, 2, step)
    assert label.dtype == np.uint8 and label.max() == len(rig.tris)  # small meshes: uint8 labels, outside included
    whole = warp.piecewise_map(table, label, rect, step)
    h = rect[3]
    for r0, r1 in ((0, h), (1, h - 1), (h // 3, h // 3 + 7), (h - 5, h), (0, 1)):
        part = warp.piecewise_map(table, label, rect, step, rows=(r0, r1))
        assert part[0].shape == (r1 - r0, rect[2])
        assert np.array_equal(part[0], whole[0][r0:r1]) and np.array_equal(part[1], whole[1][r0:r1])


def test_exact_within_over_part_of_a_map_takes_the_whole_maps_labels(photo):
    # compose draws the source map only where the mouth mask reaches, a part of the mouth rect: its exact part must
    # be that of the whole rect's map to the bit (cv2 fills triangles cut by the image edge a little differently,
    # so labels drawn over the part alone could differ)
    _, lm = photo
    rig = compose.MouthRig.from_shape(lm)
    dst = np.vstack([lm[compose.MESH_POINTS], rig.box_points(lm)])
    src = dst + np.random.default_rng(3).normal(0, 2, dst.shape)
    table = warp.affine_table(dst, src, rig.tris)
    rect = warp.crop_rect(rig.box_points(lm), 512, 600)
    inner = lm[face.LIPS_INNER]
    box = (int(inner[:, 0].min()) - 6, int(inner[:, 1].min()) - 6, int(np.ptp(inner[:, 0])) + 12, 30)
    part = (box[0] + 5, rect[1] + 3, rect[2] // 2, rect[3] - 9)  # cuts box on the left
    win = (slice(part[1] - rect[1], part[1] - rect[1] + part[3]), slice(part[0] - rect[0], part[0] - rect[0] + part[2]))
    base = warp.piecewise_map(table, warp.mesh_labels(dst, rig.tris, rect, 2), rect, 2)
    whole = [m.copy() for m in base]
    labels, order = {}, warp.draw_order(dst, rig.tris)
    warp.exact_within(*whole, rect, box, dst, rig.tris, table, labels, order)
    assert not np.array_equal(whole[0], base[0])  # (the exact part changes the map)
    got = [m[win].copy() for m in base]
    warp.exact_within(*got, part, box, dst, rig.tris, table, labels, order, label_rect=rect)
    assert len(labels) == 1  # drawn once
    assert np.array_equal(got[0], whole[0][win]) and np.array_equal(got[1], whole[1][win])


def _mouth_mesh(photo, seed: int, step: int):
    """The photo's mouth mesh (rig), its rect, the triangle labels at `step` and the affine table to randomly moved
    points (seed)."""
    _, lm = photo
    rig = compose.MouthRig.from_shape(lm)
    dst = np.vstack([lm[compose.MESH_POINTS], rig.box_points(lm)])
    src = dst + np.random.default_rng(seed).normal(0, 2, dst.shape)
    rect = warp.crop_rect(rig.box_points(lm), 512, 600)
    return rig, rect, warp.mesh_labels(dst, rig.tris, rect, step), warp.affine_table(dst, src, rig.tris)
