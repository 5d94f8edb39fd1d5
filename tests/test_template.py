"""template.py: analysed once, cached by content, frames readable without decoding, damage rebuilt; entries no
template needs are pruned once unused for a day, and a cache hit counts as use."""
import json
import os
import shutil
import time

import cv2
import numpy as np
import pytest

from heygem_watch import face, template_frames
from heygem_watch.media import MediaError
from heygem_watch.ledger import fingerprint_file
from heygem_watch.template import LIBRARY_STRIDE, META_NAME, TemplateError, load_template
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


def raw_track(t):
    with np.load(t.cache_dir / "track.npz") as z:
        return z["raw"], z["tracked"]


def test_a_short_output_tracks_its_frames_and_every_third_after_them(tpl_file, tmp_path):
    full = load_template(tpl_file, tmp_path / "full")
    short = load_template(tpl_file, tmp_path, duration_s=0.2)  # 5 frames at 25 fps + the smoothing margin
    assert (short.n_frames, short.complete, short.cache_hit, short.tracked_prefix) == (20, False, False, 8)
    assert short.tracked.tolist() == [i < 8 or i % LIBRARY_STRIDE == 0 for i in range(20)]
    # every frame is in the entry: a longer output only tracks, never decodes
    assert (short.cache_dir / "frames.yuv").stat().st_size == 20 * short.frame_bytes
    assert np.array_equal(short.frame(19), full.frame(19)) and np.array_equal(short.frame(10), full.frame(10))
    assert not short.face_found[10] and np.isnan(short.landmarks[10]).all()
    meta = json.loads((short.cache_dir / META_NAME).read_text())
    assert (meta["tracked_prefix"], meta["complete"]) == (8, False)
    # frames 0-7 and 9, 12, 15, 18 tracked; 7 has no face (8 does not count: not tracked)
    assert short.face_fraction == pytest.approx(11 / 12) and full.face_fraction == pytest.approx(18 / 20)
    assert short.face_found[[9, 12, 15, 18]].all()
    # a sampled frame stands alone between untracked ones: its own landmarks, not blended with frames 3 away
    raw, _ = raw_track(short)
    assert np.array_equal(short.landmarks[12], raw[12])
    assert np.allclose(short.landmarks[12], full.landmarks[12], atol=2.0)
    assert np.allclose(short.landmarks[:7], full.landmarks[:7], atol=0.5)
    assert load_template(tpl_file, tmp_path, duration_s=0.16).cache_hit  # a shorter output: covered


def test_a_longer_output_extends_the_prefix_from_the_cached_frames(tpl_file, tmp_path, monkeypatch):
    short = load_template(tpl_file, tmp_path, duration_s=0.2)
    short_raw, _ = raw_track(short)
    fresh = load_template(tpl_file, tmp_path / "fresh", duration_s=0.5)
    inode = (short.cache_dir / "frames.yuv").stat().st_ino

    def no_decoding(*a, **k):
        raise AssertionError("an extension decoded the template")

    monkeypatch.setattr(template_frames, "decode", no_decoding)
    longer = load_template(tpl_file, tmp_path, duration_s=0.5)  # 12 frames + 3: tracks 8, 10, 11, 13, 14
    assert (longer.cache_hit, longer.complete, longer.tracked_prefix) == (False, False, 16)  # 15 is sampled too
    assert longer.tracked.tolist() == fresh.tracked.tolist() == [i < 16 or i % 3 == 0 for i in range(20)]
    assert longer.face_found.tolist() == fresh.face_found.tolist()
    assert (longer.cache_dir / "frames.yuv").stat().st_ino == inode  # the same file, linked into the new entry
    raw, _ = raw_track(longer)
    assert np.array_equal(raw[:8][short.face_found[:8]], short_raw[:8][short.face_found[:8]])  # kept
    assert np.array_equal(raw[9], short_raw[9]) and np.array_equal(raw[18], short_raw[18])
    found = fresh.face_found
    # FaceMesh re-acquires the face where an extension starts: the same track to within ~2% of the eye distance
    assert np.allclose(longer.landmarks[found], fresh.landmarks[found], atol=2.0)
    assert load_template(tpl_file, tmp_path, duration_s=0.5).cache_hit
    whole = load_template(tpl_file, tmp_path)  # the face check: every frame
    assert (whole.complete, whole.tracked_prefix, whole.face_fraction) == (True, 20, pytest.approx(18 / 20))
    assert whole.face_found.tolist() == [i not in (7, 8) for i in range(20)]
    assert load_template(tpl_file, tmp_path, duration_s=0.1).cache_hit
    monkeypatch.undo()
    past = load_template(tpl_file, tmp_path / "past", duration_s=60)  # longer than the template: all of it
    assert past.complete and past.tracked.all()


def test_faces_only_between_the_sampled_frames_are_still_found(tmp_path):
    frames = mediagen.face_frames(12, faceless={i for i in range(12) if i < 5 or i % 3 == 0})
    p = mediagen.write_video(tmp_path / "late face.mp4", frames, 25)
    t = load_template(p, tmp_path / "c", duration_s=0.04)  # prefix 4: nothing tracked has a face
    assert t.complete and t.face_found.tolist() == [i >= 5 and i % 3 != 0 for i in range(12)]


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

    from heygem_watch.template_frames import yuv420p as _yuv420p

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
    from heygem_watch import display

    full = av.VideoFrame.from_ndarray(src, format="yuv420p").reformat(format="yuvj420p")
    full.color_range = display.FULL  # as a decoder tags it
    assert full.to_ndarray()[:64].max() == 255  # full-range bytes
    limited = _yuv420p(full)
    assert limited[:64].max() == 235 and limited[:64].min() == 16  # made limited range ...
    assert display.stored_colour(full, display.look_of(full)).range == display.LIMITED  # ... and said so


@pytest.fixture(scope="module")
def phone_file(tmp_path_factory, tpl_file):
    """tpl_file's frames as a phone stores a portrait video: turned a quarter clockwise, with a display matrix
    that turns them back on playback."""
    d = tmp_path_factory.mktemp("phone")
    stored = [np.ascontiguousarray(np.rot90(f, -1)) for f in mediagen.face_frames(20, faceless={7, 8})]
    return mediagen.write_video(d / "phone.mp4", stored, 25, display=(90, False))


def test_a_turned_template_is_cached_and_tracked_upright(tpl_file, phone_file, tmp_path):
    plain = load_template(tpl_file, tmp_path / "a")
    t = load_template(phone_file, tmp_path / "b")
    assert (t.width, t.height, t.n_frames) == (plain.width, plain.height, 20)  # 384 x 320 as shown, not as stored
    assert t.face_found.tolist() == plain.face_found.tolist()
    assert any("turned 90°" in n for n in t.notes)
    for i in (0, 12):
        assert np.abs(t.frame(i).astype(int) - plain.frame(i).astype(int)).mean() < 4
        # the face tracked where it is shown: within a few pixels of the plain file's
        ok = ~np.isnan(plain.landmarks[i, :, 0])
        assert np.abs(t.landmarks[i][ok] - plain.landmarks[i][ok]).max() < 4


@pytest.fixture(scope="module")
def hlg_file(tmp_path_factory):
    """tpl_file's frames as a phone records HDR: 10-bit, BT.2020, HLG."""
    return mediagen.write_hdr_video(tmp_path_factory.mktemp("hdr") / "hlg.mp4",
                                    mediagen.face_frames(20, faceless={7, 8}), "HLG")


def test_an_hdr_template_is_cached_as_sdr(tpl_file, hlg_file, tmp_path):
    plain = load_template(tpl_file, tmp_path / "a")
    t = load_template(hlg_file, tmp_path / "b")
    assert (t.width, t.height) == (plain.width, plain.height)
    assert t.face_found.tolist() == plain.face_found.tolist()
    assert any("HDR (HLG)" in n for n in t.notes)
    shown = list(mediagen.face_frames(20, faceless={7, 8}))
    for i in (0, 12):
        mid = shown[i].max(axis=2) < 200  # highlights above the knee are rolled off
        assert np.abs(t.frame(i).astype(int) - shown[i])[mid].mean() < 5


def test_a_version_3_entry_is_kept_when_shown_as_stored_and_rebuilt_for_a_turned_hdr_or_full_range_one(
        tpl_file, phone_file, hlg_file, tmp_path):
    from fractions import Fraction

    full = mediagen.write_video(tmp_path / "full range.mp4", mediagen.face_frames(6), 25, colour=(1, 1, 1, 2))
    dv = mediagen.write_video(tmp_path / "anamorphic.mp4", mediagen.face_frames(6), 25, sar=Fraction(8, 9))
    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), mediagen.face_photo())
    for path, kept in ((tpl_file, True), (photo, True), (phone_file, False), (hlg_file, False), (full, False),
                       (dv, False)):
        t = load_template(path, tmp_path / "c")
        meta_path = t.cache_dir / META_NAME
        meta = json.loads(meta_path.read_text())
        meta["version"] = 3  # what the code before wrote: no "colour" either
        meta.pop("colour")
        meta_path.write_text(json.dumps(meta))
        again = load_template(path, tmp_path / "c")
        assert again.cache_hit is kept, path.name
        assert json.loads(meta_path.read_text())["version"] == 4
        assert again.colour == t.colour  # what the entry lacked is read from the file


def test_a_template_larger_than_max_side_is_cached_scaled_down(tpl_file, tmp_path):
    big = mediagen.write_video(tmp_path / "4k-ish.mp4", mediagen.face_frames(6, size=(640, 768)), 25)  # 768 x 640
    t = load_template(big, tmp_path / "c", max_side=384)
    assert (t.width, t.height) == (384, 320) and t.face_found.all()
    assert any("768x640 scaled to 384x320" in n for n in t.notes)
    shown = cv2.resize(next(mediagen.face_frames(1, size=(640, 768))), (384, 320), interpolation=cv2.INTER_AREA)
    assert np.abs(t.frame(0).astype(int) - shown).mean() < 4
    assert load_template(big, tmp_path / "c", max_side=384).cache_hit
    # another limit makes the entry again; one the template is within keeps its own size
    assert (load_template(big, tmp_path / "c", max_side=0).width, load_template(big, tmp_path / "c").cache_hit) == \
        (768, True)
    small = load_template(tpl_file, tmp_path / "c", max_side=384)
    assert (small.width, small.height) == (384, 320) and not any("scaled" in n for n in small.notes)
    assert load_template(tpl_file, tmp_path / "c", max_side=1920).cache_hit  # the same entry serves both


def test_a_still_larger_than_max_side_is_scaled_down(tmp_path):
    p = tmp_path / "photo.jpg"
    cv2.imwrite(str(p), mediagen.face_photo())  # 512 x 600
    t = load_template(p, tmp_path / "c", max_side=300)
    assert (t.width, t.height) == (256, 300) and t.face_found[0]


def test_an_anamorphic_template_is_cached_with_square_pixels(tmp_path):
    from fractions import Fraction

    shown = list(mediagen.face_frames(4))  # 384 x 320 as shown
    squeezed = [cv2.resize(f, (288, 320), interpolation=cv2.INTER_AREA) for f in shown]  # pixels 4/3 as wide
    p = mediagen.write_video(tmp_path / "dv.mp4", squeezed, 25, sar=Fraction(4, 3))
    t = load_template(p, tmp_path / "c")
    assert (t.width, t.height) == (384, 320) and t.face_found.all()
    assert any("pixels 4/3 as wide as high: shown 384x320" in n for n in t.notes)
    assert np.abs(t.frame(0).astype(int) - shown[0]).mean() < 6
    from heygem_watch.media import probe

    assert (probe(p).width, probe(p).height) == (384, 320)
