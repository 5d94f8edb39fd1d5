"""engines/builtin/interior.py: lips that must meet are sampled from inside each lip, never from the interior."""
import cv2
import numpy as np

from heygem_watch import face
from heygem_watch.engines.builtin import compose, interior


def test_seal_lips_moves_the_inner_lips_inwards_only_for_a_mouth_drawn_shut(photo):
    img, lm = photo
    opened = img.copy()
    compose.compose_mouth(opened, lm, opened, lm, compose.MouthRig.from_shape(lm), 0.25, None, np.zeros(3))
    with face.FaceMesh(static_image=True) as mesh:
        wide = mesh.detect(opened).astype(np.float64)
    gap = float(face.mouth_openness(wide))
    assert interior.seal_lips(wide, gap) is wide  # drawn as open as it is: sampled where it is
    assert interior.seal_lips(wide, 0.1) is wide  # drawn open: its real lip edges stay
    sealed = interior.seal_lips(wide, 0.0)
    moved = np.flatnonzero(np.abs(sealed - wide).max(1) > 0)
    assert set(moved) <= set(face.LIPS_INNER)
    down = wide[152] - wide[6]  # chin below the nose bridge
    assert (sealed[13] - wide[13]) @ down < 0 < (sealed[14] - wide[14]) @ down  # each into its own lip
    for inner, outer in ((interior.UPPER_INNER, interior.UPPER_OUTER), (interior.LOWER_INNER, interior.LOWER_OUTER)):
        step = np.linalg.norm(sealed[inner] - wide[inner], axis=1)
        assert (step <= interior.SEAL_FRACTION * np.linalg.norm(wide[outer] - wide[inner], axis=1) + 1e-6).all()


def test_soften_seam_blurs_only_a_narrow_band_along_the_meeting_line():
    img = np.zeros((40, 60, 3), np.float32)
    img[20:] = 200.0  # a hard edge between two lips, as a sealed map leaves it
    before = img.copy()
    line = np.array([[5.0, 19.5], [55.0, 19.5]]) + (100, 50)  # full-frame pixels; the crop starts at (100, 50)
    interior.soften_seam(img, (100, 50, 60, 40), line, 100.0, 1.0)
    step = np.abs(np.diff(img[:, 30, 0]))
    assert step.max() < 0.7 * 200  # the edge is spread over more than one row (unsoftened: one step of 200)
    assert np.array_equal(img[:10], before[:10]) and np.array_equal(img[30:], before[30:])  # far away: untouched
    assert np.abs(img[:, :2] - before[:, :2]).max() < 1.0  # beyond the line's ends: (nearly) untouched
    untouched = before.copy()
    interior.soften_seam(untouched, (100, 50, 60, 40), line, 100.0, 0.0)
    assert np.array_equal(untouched, before)


def test_soften_seam_blurring_only_the_band_rows_equals_blurring_the_whole_rect():
    # it blurs only the rows the band reaches (speed): every pixel must come out as from the whole-rect formula
    rng = np.random.default_rng(3)
    for h, w, y, iod in ((40, 60, 19.5, 100.0), (90, 130, 3.0, 300.0), (90, 130, 88.0, 40.0), (25, 33, 12.0, 600.0)):
        img = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
        line = np.stack([np.linspace(-3, w + 3, 7), y + rng.normal(0, 4, 7)], 1)
        band = np.zeros((h, w), np.float32)
        cv2.polylines(band, [np.round(line * 16).astype(np.int32)], False, 1.0,
                      thickness=max(1, int(round(interior.SEAM_BAND * iod))), lineType=cv2.LINE_AA, shift=4)
        band = cv2.GaussianBlur(band, (0, 0), 1.0) * 0.7
        want = img + (cv2.GaussianBlur(img, (0, 0), interior.SEAM_SOFT_PX) - img) * band[..., None]
        interior.soften_seam(img, (0, 0, w, h), line, iod, 0.7)
        assert np.array_equal(img, want)


def _contour(cx: float, cy: float, half_w: float, half_h: float) -> np.ndarray:
    """An inner-lip contour (20, 2 pixels) in face.LIPS_INNER order: left corner, upper lip left to right, right
    corner, lower lip right to left."""
    t = np.linspace(np.pi, 0.0, 11)
    upper = np.stack([cx + half_w * np.cos(t), cy - half_h * np.sin(t)], 1)
    lower = np.stack([cx + half_w * np.cos(t), cy + half_h * np.sin(t)], 1)
    return np.vstack([upper, lower[-2:0:-1]])


def test_split_interior_reads_the_source_corner_at_the_drawn_corner():
    # a drawn mouth wider than its source: its inner corners lie where the source's lips are shut. They must read
    # the source's own corners (alpha 1: no cavity), not be left to the synthetic cavity's darkest shade (the black
    # diamonds at the corners of an open mouth)
    import cv2

    head = (np.array([0.0, 0.0]), np.eye(2), 100.0)
    src_inner = _contour(100.0, 60.0, 30.0, 14.0)
    rect = (50, 30, 100, 60)
    src = np.full((200, 200, 3), 150, np.uint8)
    inside = np.zeros(rect[:1:-1], np.uint8)

    def drawn_inside(inner):
        inside[:] = 0
        cv2.fillPoly(inside, [np.round(inner - rect[:2]).astype(np.int32)], 1)
        return cv2.erode(inside, np.ones((3, 3), np.uint8)) > 0

    narrower_and_wider = _contour(100.0, 60.0, 36.0, 12.0)
    _, alpha = interior.split_interior(rect, head, narrower_and_wider, src_inner, np.eye(2, 3), src)
    assert alpha[drawn_inside(narrower_and_wider)].min() > 0.95
    # drawn open wider than the source: each lip keeps what lay within the source's half gap of it, and the new
    # gap between them is still left to the cavity
    taller = _contour(100.0, 60.0, 36.0, 24.0)
    _, alpha = interior.split_interior(rect, head, taller, src_inner, np.eye(2, 3), src)
    column = alpha[:, 100 - rect[0]]
    assert column[60 - 24 + 4 - rect[1]] > 0.95 and column[60 + 24 - 4 - rect[1]] > 0.95
    assert column[60 - rect[1]] < 0.05


def test_split_interior_joins_its_halves_without_a_step():
    # a mouth drawn less open than its source leaves out a strip of the source's interior between the upper and
    # lower halves; cut hard, a smooth interior (here dark under the upper lip, lighter towards the tongue) shows a
    # horizontal edge along the join. Cross-faded, no row-to-row step is much more than the gradient's own
    head = (np.array([0.0, 0.0]), np.eye(2), 100.0)
    src_inner = _contour(100.0, 60.0, 30.0, 14.0)
    rect = (50, 30, 100, 60)
    ramp = np.clip(40.0 + (np.arange(200) - 46.0) * (160.0 / 28.0), 40.0, 200.0)  # 5.7 per row between the lips
    src = np.repeat(np.repeat(ramp[:, None, None], 200, 1), 3, 2).astype(np.float32)
    shorter = _contour(100.0, 60.0, 30.0, 8.0)
    img, alpha = interior.split_interior(rect, head, shorter, src_inner, np.eye(2, 3), src)
    col = img[60 - 7 - rect[1]:60 + 8 - rect[1], 100 - rect[0], 0]
    assert alpha[60 - 7 - rect[1]:60 + 8 - rect[1], 100 - rect[0]].min() > 0.95
    assert np.abs(np.diff(col)).max() < 30.0  # old: a single step of ~75 (12 rows of the ramp left out)
    assert col[-1] - col[0] > 60.0  # still dark at the top, light at the bottom: the halves are kept


def test_split_interior_bridges_a_gap_barely_wider_than_the_source():
    # drawn a pixel more open than its source (teeth meeting), the new gap between the halves is too thin to show
    # as anything but a dark line across the teeth: both halves reach across it, no cavity
    head = (np.array([0.0, 0.0]), np.eye(2), 100.0)
    src_inner = _contour(100.0, 60.0, 30.0, 6.0)
    rect = (50, 30, 100, 60)
    src = np.full((200, 200, 3), 210, np.uint8)
    wider = _contour(100.0, 60.0, 30.0, 6.5)
    _, alpha = interior.split_interior(rect, head, wider, src_inner, np.eye(2, 3), src)
    assert alpha[60 - 5 - rect[1]:60 + 6 - rect[1], 85 - rect[0]:116 - rect[0]].min() > 0.9  # old: 0.34
    # a clearly open new gap still goes to the cavity
    tall = _contour(100.0, 60.0, 30.0, 14.0)
    _, alpha = interior.split_interior(rect, head, tall, src_inner, np.eye(2, 3), src)
    assert alpha[60 - rect[1], 100 - rect[0]] < 0.05
