"""Watching incoming/: a file is handed on only once it is complete.

Complete = size and mtime unchanged for `settle_seconds` AND no process holds it open for writing (checked
through /proc/*/fd, best effort: processes of other users are invisible, the settle time still protects).
Events come from a watchdog observer (inotify, or polling for network shares) plus a full scan at start-up and
on every `scan()` call (the daemon schedules one periodically), so nothing that arrived while we were down or
whose event was lost is missed. Only the top level of incoming/ is watched.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

TEMP_SUFFIXES = (".part", ".tmp", ".temp", ".crdownload", ".partial", ".download", "~")
CHECK_INTERVAL_S = 1.0  # how often candidates are re-examined (at most; less when settle time is short)
O_ACCMODE, O_WRONLY, O_RDWR = 0o3, 0o1, 0o2


def ignored_name(name: str) -> bool:
    """Hidden and temporary files are never recordings (OBS, browsers and rsync write under such names)."""
    low = name.lower()
    return name.startswith(".") or low.endswith(TEMP_SUFFIXES)


def open_for_writing(path: os.PathLike | str, proc: str = "/proc") -> bool:
    """True if any visible process has `path` open with write access. False when /proc is unavailable."""
    target = os.path.realpath(path)
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) != target:
                    continue
                with open(os.path.join(proc, pid, "fdinfo", fd)) as f:
                    for line in f:
                        if line.startswith("flags:"):
                            flags = int(line.split()[1], 8)
                            if flags & O_ACCMODE in (O_WRONLY, O_RDWR):
                                return True
            except (OSError, ValueError):
                continue
    return False


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float  # clock() when size/mtime were last seen to change
    first_seen: float


class IncomingWatcher:
    """Finds complete recordings in `incoming` and calls on_ready(path) once per (path, size, mtime).

    clock and writer_check are injectable so tests need not sleep through real settle times.
    on_refused(path, reason) hears about symlinks and paths that escape the folder (once per path).
    """

    def __init__(self, incoming: os.PathLike | str, extensions: Iterable[str], settle_seconds: float,
                 on_ready: Callable[[Path], None], *, polling: bool = False,
                 on_refused: Callable[[Path, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 writer_check: Callable[[Path], bool] = open_for_writing):
        self.incoming = Path(incoming)
        self.extensions = tuple(e.lower() for e in extensions)
        self.settle_seconds = float(settle_seconds)
        self.on_ready, self.on_refused = on_ready, on_refused
        self.polling, self.clock, self.writer_check = polling, clock, writer_check
        self._cands: dict[Path, _Candidate] = {}
        self._handed: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) when handed on
        self._refused: set[Path] = set()
        self._lock = threading.RLock()
        self._observer = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- discovery --------------------------------------------------------------------------------------------
    def notice(self, path: os.PathLike | str) -> None:
        """A file may have appeared or changed (watchdog event or scan)."""
        path = Path(path)
        if path.parent != self.incoming or ignored_name(path.name):
            return
        if path.suffix.lower() not in self.extensions:
            return
        reason = self._refusal(path)
        if reason:
            with self._lock:
                first = path not in self._refused
                self._refused.add(path)
            if first and self.on_refused:
                self.on_refused(path, reason)
            return
        try:
            st = path.stat()
        except OSError:
            return
        now = self.clock()
        with self._lock:
            if self._handed.get(path) == (st.st_size, st.st_mtime_ns):
                return
            c = self._cands.get(path)
            if c is None:
                self._cands[path] = _Candidate(st.st_size, st.st_mtime_ns, now, now)
            elif (c.size, c.mtime_ns) != (st.st_size, st.st_mtime_ns):
                c.size, c.mtime_ns, c.stable_since = st.st_size, st.st_mtime_ns, now

    def _refusal(self, path: Path) -> str | None:
        if path.is_symlink():
            return "symlinks are refused (copy or move the file into the folder instead)"
        try:
            real = path.resolve(strict=True)
            base = self.incoming.resolve(strict=True)
        except (OSError, RuntimeError):
            return None  # vanished; nothing to refuse
        if real.parent != base:
            return f"resolves outside the incoming folder ({real})"
        if not real.is_file():
            return "not a regular file"
        return None

    def scan(self) -> int:
        """Look at every file in incoming (start-up and periodic rescans). Returns how many were looked at."""
        n = 0
        try:
            entries = list(os.scandir(self.incoming))
        except OSError:
            return 0
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                continue
            self.notice(Path(e.path))
            n += 1
        with self._lock:  # forget what is no longer there (a re-dropped file with the same name is new)
            for p in [p for p in self._handed if not p.exists()]:
                del self._handed[p]
            for p in [p for p in self._refused if not os.path.lexists(p)]:
                self._refused.discard(p)
        return n

    # -- settling ---------------------------------------------------------------------------------------------
    def check(self) -> list[Path]:
        """Hand on every candidate that has settled; returns them (arrival order: mtime, then name)."""
        now = self.clock()
        ready: list[tuple[int, str, Path, _Candidate]] = []
        with self._lock:
            for path, c in list(self._cands.items()):
                try:
                    st = path.stat()
                except OSError:
                    del self._cands[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                    c.size, c.mtime_ns, c.stable_since = st.st_size, st.st_mtime_ns, now
                    continue
                if now - c.stable_since < self.settle_seconds:
                    continue
                ready.append((c.mtime_ns, path.name, path, c))
        ready.sort(key=lambda r: (r[0], r[1]))
        out = []
        for _, _, path, c in ready:
            if self.writer_check(path):
                with self._lock:
                    c.stable_since = now  # still open by its writer: wait a full settle period after it closes
                continue
            with self._lock:
                self._cands.pop(path, None)
                self._handed[path] = (c.size, c.mtime_ns)
            out.append(path)
            try:
                self.on_ready(path)
            except Exception:
                self.forget(path)  # taken again on the next scan
                raise
        return out

    def forget(self, path: os.PathLike | str) -> None:
        """Let a path be handed on again (the daemon could not take it this time, e.g. no templates)."""
        with self._lock:
            self._handed.pop(Path(path), None)

    def pending(self) -> list[Path]:
        with self._lock:
            return sorted(self._cands)

    # -- running ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the observer and the settle thread, then scan what is already there."""
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_created(self, event):
                if not event.is_directory:
                    watcher.notice(event.src_path)

            def on_modified(self, event):
                if not event.is_directory:
                    watcher.notice(event.src_path)

            def on_closed(self, event):
                if not event.is_directory:
                    watcher.notice(event.src_path)

            def on_moved(self, event):
                if not event.is_directory:
                    watcher.notice(event.dest_path)

        self.incoming.mkdir(parents=True, exist_ok=True)
        if self.polling:
            from watchdog.observers.polling import PollingObserver as Observer
        else:
            from watchdog.observers import Observer
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.incoming), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        self.scan()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="settle", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        interval = max(0.05, min(CHECK_INTERVAL_S, self.settle_seconds / 4 or CHECK_INTERVAL_S))
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:  # the settle thread must survive anything one file does
                import structlog

                structlog.get_logger("heygem").exception("watch_check_failed")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop observing; waits at most about `timeout` seconds (the threads are daemons)."""
        self._stop.set()
        if self._observer is not None:
            self._observer.unschedule_all()
            self._observer.stop()
            self._observer.join(timeout=timeout / 2)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=timeout / 2)
            self._thread = None
