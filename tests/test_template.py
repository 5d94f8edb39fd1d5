"""template.py: analysed once, cached by content, frames readable without decoding, damage rebuilt; entries no
template needs are pruned once unused for a day, and a cache hit counts as use."""
import os
import shutil
import time

import cv2
import numpy as np
import pytest

from heygem_watch import face
from heygem_watch.media import MediaError
from heygem_watch.ledger import fingerprint_file
from heygem_watch.template import META_NAME, TemplateError, load_template
from heygem_watch.template_cache import CACHE_UNUSED_S, prune_cache
from tests import mediagen


@pytest.fixture(scope="module")
def tpl_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpl")
    return mediagen.write_video(d / "host video.mp4", mediagen.face_frames(20, faceless={7, 8}), 25)


def test_analysis_finds_the_face_and_caches(tpl_file, tmp_path):
    t = load_template(tpl_file, tmp_path)
    assert (t.n_frames, t.width, t.height, float(t.fps)) == (20, 384, 320, 25.0)
    assert not t.cache_hit and t.analysis_s > 0
    assert t.face_found.tolist() == [i not in (7, 8) for i in range(20)]
    assert np.isnan(t.landmarks[7]).all() and not np.isnan(t.landmarks[0]).any()
    # the mouth sits in the lower middle of the face, below the eyes
    lm = t.landmarks[0]
    assert lm[face.UPPER_LIP_INNER_MID, 1] > lm[face.EYE_OUTER_L, 1] + 20
    again = load_template(tpl_file, tmp_path)
    assert again.cache_hit and again.analysis_s == 0.0
    assert np.allclose(again.landmarks[0], lm)


def test_cached_frames_match_the_decoded_video(tpl_file, tmp_path):
    t = load_template(tpl_file, tmp_path)
    decoded = list(mediagen_decode(tpl_file))
    for i in (0, 5, 19):
        assert np.abs(t.frame(i).astype(int) - decoded[i]).mean() < 3.0
    with pytest.raises(IndexError):
        t.frame(20)


def mediagen_decode(path):
    from heygem_watch.media import iter_video_frames
    return iter_video_frames(path)


def test_changed_file_gets_new_entry_and_damage_is_rebuilt(tpl_file, tmp_path):
    t1 = load_template(tpl_file, tmp_path)
    (t1.cache_dir / "track.npz").write_bytes(b"garbage")
    t2 = load_template(tpl_file, tmp_path)
    assert not t2.cache_hit and t2.face_found.sum() == 18
    copy = tmp_path / "edited.mp4"
    shutil.copy(tpl_file, copy)
    with open(copy, "ab") as f:
        f.write(b"\0")
    t3 = load_template(copy, tmp_path)
    assert t3.fingerprint != t2.fingerprint and t3.cache_dir != t2.cache_dir


def test_still_photo_is_a_one_frame_template(tmp_path):
    p = tmp_path / "photo.jpg"
    cv2.imwrite(str(p), mediagen.face_photo())
    t = load_template(p, tmp_path / "c")
    assert t.is_image and t.n_frames == 1 and float(t.fps) == 25 and t.face_found[0]


def test_template_without_face_is_refused_with_reason(tmp_path):
    p = mediagen.write_video(tmp_path / "wall.mp4", (np.full((64, 64, 3), 128, np.uint8) for _ in range(5)), 25)
    with pytest.raises(TemplateError, match="no face found"):
        load_template(p, tmp_path / "c")


def test_missing_and_empty(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_template(tmp_path / "nope.mp4", tmp_path)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_template(tmp_path / "empty.mp4", tmp_path)


def test_only_the_frames_an_output_shows_are_analysed_then_extended(tpl_file, tmp_path):
    full = load_template(tpl_file, tmp_path / "full")
    short = load_template(tpl_file, tmp_path, duration_s=0.2)  # 5 frames at 25 fps + the smoothing margin
    assert (short.n_frames, short.complete, short.cache_hit) == (8, False, False)
    assert load_template(tpl_file, tmp_path, duration_s=0.16).cache_hit  # a shorter output: covered
    assert np.array_equal(short.frame(7), full.frame(7))
    longer = load_template(tpl_file, tmp_path, duration_s=0.5)  # extends the cached prefix
    assert (longer.n_frames, longer.complete, longer.cache_hit) == (15, False, False)
    assert longer.face_found.tolist() == full.face_found[:15].tolist()
    assert np.array_equal(longer.frame(14), full.frame(14))
    assert np.allclose(longer.landmarks[:10][longer.face_found[:10]], full.landmarks[:10][full.face_found[:10]],
                       atol=0.5)
    whole = load_template(tpl_file, tmp_path, duration_s=60)  # past the end: the whole template, complete
    assert (whole.n_frames, whole.complete) == (20, True)
    assert load_template(tpl_file, tmp_path).cache_hit
    # FaceMesh re-acquires the face where an extension starts: the same track to within ~2% of the eye distance
    assert np.allclose(whole.landmarks[whole.face_found], full.landmarks[full.face_found], atol=2.0)


DAY = 24 * 3600


def entry(root, name, age_s, size=1000):
    d = root / "templates" / name
    d.mkdir(parents=True)
    (d / "frames.yuv").write_bytes(b"\0" * size)
    (d / META_NAME).write_text("{}")
    t = time.time() - age_s
    for p in (d / "frames.yuv", d / META_NAME, d):
        os.utime(p, (t, t))
    return d


def test_prunes_only_unused_entries_no_template_needs(tmp_path):
    keep_fp = "a" * 40
    kept_old = entry(tmp_path, keep_fp[:32], 10 * DAY)  # a current template's cache: kept however old
    stale = entry(tmp_path, "b" * 32, 2 * DAY, size=5000)
    recent = entry(tmp_path, "c" * 32, 3600)  # used an hour ago (a web upload's, say): kept for now
    leftover = entry(tmp_path, "d" * 32 + ".tmp123.456", 2 * DAY)  # an interrupted analysis
    young_tmp = entry(tmp_path, "e" * 32 + ".tmp9.9", 10)  # an analysis in progress elsewhere
    removed = prune_cache(tmp_path, {keep_fp})
    assert sorted((p.name, n) for p, n in removed) == sorted([(stale.name, 5002), (leftover.name, 1002)])
    assert kept_old.exists() and recent.exists() and young_tmp.exists()
    assert not stale.exists() and not leftover.exists()
    # a fresh file inside an old folder counts as use
    os.utime(recent / "frames.yuv", (time.time() - 2 * DAY,) * 2)
    os.utime(recent / META_NAME)
    assert prune_cache(tmp_path, {keep_fp}, now=time.time() + 60) == []
    later = prune_cache(tmp_path, {keep_fp}, now=time.time() + CACHE_UNUSED_S + 60)
    assert sorted(p.name for p, _ in later) == sorted([recent.name, young_tmp.name]) and kept_old.exists()


def test_missing_cache_folder_is_fine(tmp_path):
    assert prune_cache(tmp_path / "nope", set()) == []


def test_cache_hit_marks_the_entry_used(tmp_path, face_template_file):
    cache = tmp_path / "cache"
    tpl = load_template(face_template_file, cache)
    meta = tpl.cache_dir / META_NAME
    assert tpl.cache_dir.name == fingerprint_file(face_template_file)[:32]
    old = time.time() - 3 * DAY
    os.utime(meta, (old, old))
    for f in meta.parent.iterdir():
        os.utime(f, (old, old))
    hit = load_template(face_template_file, cache)
    assert hit.cache_hit and time.time() - meta.stat().st_mtime < 60
    assert prune_cache(cache, set()) == []


def test_decoded_yuv_is_what_to_ndarray_gives_and_refills_a_spare_array():
    import queue

    import av

    from heygem_watch.template import _yuv420p

    src = np.random.default_rng(3).integers(0, 256, (96, 90), np.uint8)  # 90x64 frame: rows padded in memory
    frame = av.VideoFrame.from_ndarray(src, format="yuv420p")
    assert frame.planes[0].line_size > frame.width and frame.planes[1].line_size > frame.planes[1].width
    spare: queue.SimpleQueue = queue.SimpleQueue()
    reused = np.zeros((96, 90), np.uint8)
    spare.put(np.zeros((6, 4), np.uint8))  # another size: dropped, not filled
    spare.put(reused)
    out = _yuv420p(frame, spare)
    assert out is reused
    assert np.array_equal(out, frame.to_ndarray(format="yuv420p")) and np.array_equal(out, src)
    assert np.array_equal(_yuv420p(frame), src)  # nothing spare: a new array
    full = av.VideoFrame.from_ndarray(src, format="yuv420p").reformat(format="yuvj420p")
    assert np.array_equal(_yuv420p(full), full.to_ndarray(format="yuv420p"))  # converted as before
