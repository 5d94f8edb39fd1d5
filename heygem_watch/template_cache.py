"""The template cache's folders (var/cache/templates/<key>/): where an entry lives, where an analysis writes it
before it is moved into place, and the housekeeping that deletes entries nothing uses any more and the leftovers of
analyses that were killed. What an entry holds (frames, face track, meta.json) is template.py's business; here an
entry is a folder whose files' mtimes say when it was last written or used.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

CACHE_SUBDIR = "templates"  # entries: cache_root/templates/<first 32 characters of the fingerprint>/
# An entry holds the decoded frames (width x height x 1.5 bytes each: a minute of 1080p30 is 5.6 GB), so entries no
# template needs any more (replaced, deleted, a one-off web upload) are pruned once unused this long.
CACHE_UNUSED_S = 24 * 3600


def entry_dir(cache_root: os.PathLike | str, fp: str) -> Path:
    return Path(cache_root) / CACHE_SUBDIR / fp[:32]


def work_dir(cache_dir: Path) -> Path:
    """Where this thread's analysis of cache_dir's entry is written first (remove_stale_work finds it by its pid)."""
    return cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}.{threading.get_ident()}")


def install_entry(tmp: Path, cache_dir: Path, replace: bool) -> None:
    """Move a finished analysis into place. A new entry: rename (another process finishing the same template
    first wins). An extended one: the old entry is moved aside first (readers that still have its files open keep
    reading them; the new frames file starts with the same bytes)."""
    if replace:
        old = cache_dir.with_name(cache_dir.name + f".old{os.getpid()}.{threading.get_ident()}")
        try:
            os.replace(cache_dir, old)
        except OSError:
            pass
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, cache_dir)
    except OSError:  # another process finished the same template first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)


def prune_cache(cache_root: os.PathLike | str, keep_fingerprints, unused_s: float = CACHE_UNUSED_S,
                now: float | None = None) -> list[tuple[Path, int]]:
    """Delete the cache entries of templates no kept fingerprint names that nothing has written or used (a cache
    hit touches meta.json) for unused_s seconds; leftovers of interrupted analyses (<key>.tmp…, <key>.old…) go on
    the same clock. Returns (folder, bytes freed) for each."""
    keep = {entry_dir(cache_root, str(f)).name for f in keep_fingerprints}
    now = time.time() if now is None else now
    removed: list[tuple[Path, int]] = []
    for d in _entries(cache_root):
        if not d.is_dir() or d.is_symlink() or d.name in keep:
            continue
        try:
            last = max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir() if f.is_file()])
        except OSError:
            continue
        if now - last >= unused_s:
            _remove_entry(d, removed)
    return removed


def remove_stale_work(cache_root: os.PathLike | str) -> list[tuple[Path, int]]:
    """Start-up: delete half-written entries (<key>.tmp<pid>.<tid>/, <key>.old<pid>.<tid>/) whose process is gone
    (a kill -9 during analysis leaves nearly a whole entry: GBs for 1080p). Those of live processes (the web
    dashboard's face check, a `process` run) are left alone; our own pid counts as gone (a container restarts
    with the same pids), so call it before this process analyses anything. Returns (folder, bytes freed)."""
    import re

    removed: list[tuple[Path, int]] = []
    for d in _entries(cache_root):
        m = re.fullmatch(r"[0-9a-f]+\.(?:tmp|old)(\d+)\.\d+", d.name)
        if not m or not d.is_dir() or d.is_symlink() or _alive(int(m.group(1))):
            continue
        _remove_entry(d, removed)
    return removed


def _entries(cache_root: os.PathLike | str) -> list[Path]:
    """Everything in the template cache folder (none when it is missing or unreadable)."""
    try:
        return list((Path(cache_root) / CACHE_SUBDIR).iterdir())
    except OSError:
        return []


def _remove_entry(d: Path, removed: list[tuple[Path, int]]) -> None:
    """Delete cache folder d; when it is gone, note (d, bytes its files held) in removed."""
    try:
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    except OSError:  # already going (another process pruning the same cache)
        return
    shutil.rmtree(d, ignore_errors=True)
    if not d.exists():
        removed.append((d, size))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True
