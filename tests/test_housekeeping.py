"""housekeeping.py: template cache pruning (what no template needs, once unused for a day), and that a cache hit
counts as use."""
import os
import time

from heygem_watch.housekeeping import CACHE_UNUSED_S, prune_template_cache
from heygem_watch.ledger import fingerprint_file
from heygem_watch.template import META_NAME, load_template

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
    removed = prune_template_cache(tmp_path, {keep_fp})
    assert sorted((p.name, n) for p, n in removed) == sorted([(stale.name, 5002), (leftover.name, 1002)])
    assert kept_old.exists() and recent.exists() and young_tmp.exists()
    assert not stale.exists() and not leftover.exists()
    # a fresh file inside an old folder counts as use
    os.utime(recent / "frames.yuv", (time.time() - 2 * DAY,) * 2)
    os.utime(recent / META_NAME)
    assert prune_template_cache(tmp_path, {keep_fp}, now=time.time() + 60) == []
    later = prune_template_cache(tmp_path, {keep_fp}, now=time.time() + CACHE_UNUSED_S + 60)
    assert sorted(p.name for p, _ in later) == sorted([recent.name, young_tmp.name]) and kept_old.exists()


def test_missing_cache_folder_is_fine(tmp_path):
    assert prune_template_cache(tmp_path / "nope", set()) == []


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
    assert prune_template_cache(cache, set()) == []
