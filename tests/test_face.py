"""face.py: temporal filters stay inside runs of frames with a face."""
import numpy as np

from heygem_watch.face import found_runs, smooth_landmarks


def test_found_runs_are_half_open_ranges_of_true():
    assert found_runs(np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], bool)) == [(0, 2), (4, 5), (6, 9)]
    assert found_runs(np.zeros(4, bool)) == [] and found_runs(np.ones(3, bool)) == [(0, 3)]


def test_smoothing_removes_jitter_but_never_blends_across_a_lost_face():
    rng = np.random.default_rng(0)
    n = 40
    lm = np.zeros((n, 478, 2), np.float32)
    lm[:20] = 100.0
    lm[20:] = 300.0  # a cut: the head is elsewhere after the gap
    lm += rng.normal(0, 1.0, lm.shape).astype(np.float32)
    found = np.ones(n, bool)
    found[19:21] = False
    lm[~found] = np.nan
    out = smooth_landmarks(lm, found)
    assert np.isnan(out[19]).all() and np.isnan(out[20]).all()
    assert np.abs(out[:19] - 100).max() < 5 and np.abs(out[21:] - 300).max() < 5  # nothing pulled across the cut
    assert np.std(np.diff(out[2:17, :, 0], axis=0)) < 0.8 * np.std(np.diff(lm[2:17, :, 0], axis=0))
