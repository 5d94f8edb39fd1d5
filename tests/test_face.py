"""face.py: temporal filters stay inside runs of frames with a face; the parallel tracker matches one FaceMesh."""
import cv2
import numpy as np
import pytest

from heygem_watch.face import FaceMesh, TrackPool, found_runs, smooth_landmarks
from tests.mediagen import face_frames


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


def test_track_pool_matches_a_single_tracker_in_frame_order():
    frames = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in face_frames(24, faceless={9, 10})]
    h, w = frames[0].shape[:2]
    with FaceMesh() as mesh:
        single = [mesh.detect_rgb(f, w, h) for f in frames]
    with TrackPool(workers=2, block=4) as pool:  # blocks 0,2,4 on one instance, 1,3,5 on the other
        for i, f in enumerate(frames):
            pool.submit(i, f, w, h)
        got = pool.finish()
    assert sorted(got) == list(range(24))
    assert [got[i] is None for i in range(24)] == [s is None for s in single]
    assert got[9] is None and got[10] is None and got[11] is not None
    diff = [np.abs(got[i] - single[i]).mean() for i in range(24) if single[i] is not None]
    assert max(diff) < 1.5, diff  # pixels, on a 320x384 frame


def test_track_pool_reports_a_worker_failure_and_never_hangs():
    pool = TrackPool(workers=2, block=1)
    pool.submit(0, np.zeros((8, 8), np.uint8), 8, 8)  # not an RGB image: MediaPipe refuses it
    for i in range(1, 6):  # the failed instance keeps taking frames: no deadlock
        try:
            pool.submit(i, np.zeros((64, 64, 3), np.uint8), 64, 64)
        except Exception:
            break
    with pytest.raises(Exception):
        pool.finish()


def test_landmarks_read_from_the_wire_equal_the_attribute_reads():
    from heygem_watch.face import _face_mesh_module, _xy

    _face_mesh_module()
    from mediapipe.framework.formats import landmark_pb2

    pts = np.random.default_rng(5).normal(0.5, 0.6, (478, 3)).astype(np.float32)
    pts[7] = 0.0  # set fields that hold 0 are still on the wire
    lst = landmark_pb2.NormalizedLandmarkList()
    for x, y, z in pts:
        lst.landmark.add(x=float(x), y=float(y), z=float(z))
    want = np.array([(p.x, p.y) for p in lst.landmark], np.float32)
    assert _xy(lst).dtype == np.float32 and _xy(lst).tobytes() == want.tobytes()
    assert _xy(lst).tobytes() == pts[:, :2].tobytes()
    lst.landmark[3].visibility = 0.25  # another layout: read through the attributes, same values
    assert _xy(lst).tobytes() == want.tobytes()
    short = landmark_pb2.NormalizedLandmarkList()
    short.landmark.add(x=0.5, y=0.25)  # no z
    assert _xy(short).tolist() == [[0.5, 0.25]]
