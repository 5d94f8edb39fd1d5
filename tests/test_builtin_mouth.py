"""engines/builtin/mouth.py: landmarks on a real photo, descriptors that follow the mouth, coherent frame selection, cache."""
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from heygem_watch import face
from heygem_watch.engines.builtin import mouth


def test_landmarks_found_on_the_photo(photo):
    img, lm = photo
    assert lm is not None and lm.shape == (478, 2) and np.isfinite(lm).all()
    # mouth below the eyes, eyes apart by a plausible fraction of the picture
    assert lm[13, 1] > lm[33, 1] + 40
    assert 0.15 * img.shape[1] < face.inter_ocular(lm) < 0.6 * img.shape[1]


def test_descriptors_move_when_the_mouth_moves(photo):
    _, lm = photo
    base = mouth.descriptors(lm.astype(np.float64))
    opened = lm.astype(np.float64).copy()
    drop = 0.1 * face.inter_ocular(lm)
    opened[mouth.LOWER_INNER + mouth.LOWER_OUTER, 1] += drop
    wide = lm.astype(np.float64).copy()
    wide[61, 0] -= drop
    wide[291, 0] += drop
    d_open, d_wide = mouth.descriptors(opened), mouth.descriptors(wide)
    assert d_open[0] == pytest.approx(base[0] + 0.1, abs=0.02)  # openness in inter-ocular units
    assert d_open[1] == pytest.approx(base[1], abs=1e-6)
    assert d_wide[1] == pytest.approx(base[1] + 0.2, abs=0.02)
    assert d_wide[2] < base[2]  # wider mouth = less rounded
    # head pose normalisation: a rotated, scaled, shifted face has the same descriptors
    th = 0.3
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    moved = opened @ r.T * 1.7 + (40, -25)
    assert np.allclose(mouth.descriptors(moved)[:3], d_open[:3], atol=1e-6)
    assert np.allclose(mouth.normalise(moved), mouth.normalise(opened), atol=1e-6)


def test_similarity_recovers_a_known_transform(photo):
    _, lm = photo
    m = np.array([[0.9, -0.2, 12.0], [0.2, 0.9, -7.0]])
    est = mouth.similarity(lm.astype(np.float64), mouth.apply_affine(m, lm.astype(np.float64)))
    assert np.allclose(est, m, atol=1e-6)


def _library(openness: np.ndarray) -> mouth.MouthLibrary:
    n = len(openness)
    z = np.zeros(n, np.float32)
    return mouth.MouthLibrary(openness.astype(np.float32), z + 0.5, z + 0.3, z, z + 1.0, np.zeros((n, 2), np.float32),
                              np.ones(n, bool), np.arange(n, dtype=np.int32), np.array([200, 200, 200], np.float32))


def _select(lib, targets, lag=mouth.LAG):
    sel = mouth.Selector(lib, lag=lag)
    out = []
    for o in targets:
        out += sel.push(float(o), 0.5)
    out += sel.flush()
    return np.array(out)


def test_selection_follows_targets_and_prefers_consecutive_frames():
    rng = np.random.default_rng(3)
    # a talking template: openness wanders between 0 and 0.2
    lib_open = np.clip(0.1 + 0.1 * np.sin(np.arange(300) / 4.0) + 0.01 * rng.standard_normal(300), 0, 0.25)
    lib = _library(lib_open)
    targets = np.clip(0.1 + 0.1 * np.sin(np.arange(200) / 4.3 + 1.0), 0, 0.25)
    chosen = _select(lib, targets)
    assert len(chosen) == len(targets)
    err = np.abs(lib_open[chosen] - targets)
    assert np.median(err) < 0.02
    steps = np.diff(chosen)
    assert np.mean(np.abs(steps) <= 1) > 0.8  # mostly runs of neighbouring template frames
    # without the transition costs the same targets give a slideshow: many more jumps
    greedy = np.array([int(np.argmin(np.abs(lib_open - t) + 0 * t)) for t in targets])
    assert np.mean(np.abs(np.diff(greedy)) > 1) > 2 * np.mean(np.abs(steps) > 1)


def test_selection_prefers_a_frame_more_open_than_wanted_to_one_equally_less_open():
    # frame 0 misses the wanted 0.10 by 0.03 below, frame 1 by 0.03 above: the wider one can be drawn exactly (its
    # lips cover the extra interior), the narrower one would need a synthesised interior
    lib = _library(np.array([0.07, 0.13], np.float32))
    assert mouth.Selector(lib).unary(0.10, 0.5, None).argmin() == 1
    assert _select(lib, [0.10] * 12).tolist() == [1] * 12
    # a miss below still beats a much larger one above
    lib = _library(np.array([0.07, 0.20], np.float32))
    assert mouth.Selector(lib).unary(0.10, 0.5, None).argmin() == 0


def test_selection_is_consistent_with_lag_and_flush():
    lib = _library(np.linspace(0, 0.2, 50))
    targets = np.r_[np.zeros(20), np.full(20, 0.2)]
    for lag in (1, 4, 30):
        chosen = _select(lib, targets, lag)
        assert len(chosen) == 40
        assert lib.openness[chosen[:10]].max() < 0.05 and lib.openness[chosen[-10:]].min() > 0.15


@dataclass
class _Tpl:
    frames: list
    landmarks: np.ndarray
    face_found: np.ndarray
    cache_dir: Path
    fps: Fraction = Fraction(25)

    @property
    def n_frames(self):
        return len(self.frames)

    @property
    def width(self):
        return self.frames[0].shape[1]

    @property
    def height(self):
        return self.frames[0].shape[0]

    def frame(self, i):
        return self.frames[i].copy()


def test_library_measures_frames_and_is_cached(photo, tmp_path):
    img, lm = photo
    dark = img.copy()
    dark[:] = 40
    tpl = _Tpl([img, img, dark], np.stack([lm, lm, np.full_like(lm, np.nan)]), np.array([True, True, False]),
               tmp_path)
    lib = mouth.analyse_mouths(tpl)
    assert lib.valid.tolist() == [True, True, False]
    assert lib.openness[0] == pytest.approx(face.mouth_openness(lm), abs=1e-4)
    assert (tmp_path / mouth.CACHE_NAME).exists()
    again = mouth.analyse_mouths(tpl)
    assert np.array_equal(again.openness, lib.openness)
    (tmp_path / mouth.CACHE_NAME).write_bytes(b"garbage")  # damaged cache: rebuilt, not an error
    rebuilt = mouth.analyse_mouths(tpl)
    assert np.allclose(rebuilt.openness, lib.openness)
