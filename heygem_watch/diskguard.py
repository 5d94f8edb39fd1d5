"""The disk guard: new tasks wait while var/ has less than HEYGEM_MIN_FREE_MB free, or after a write failed for
lack of space (ENOSPC, SQLite "database or disk is full") anywhere in a task. Such a task goes back to the queue as
it was (a clean stop, never a failure or a crash), its work files go, and one `disk_low` event says why (then at
most one a minute); work resumes by itself once space returns (`disk_ok`). A mixin of daemon.Daemon.
"""
from __future__ import annotations

import shutil
import time

from heygem_watch.housekeeping import disk_full
from heygem_watch.ledger import Recording, Task
from heygem_watch.logs import log_context

DISK_LOG_EVERY_S = 60.0
# After a write failed for lack of space, tasks wait until this much more is free than at the failure (retrying at
# once would fail the same way), or this share of the file system on a small one
DISK_FULL_RESUME_MB = 512
DISK_FULL_RESUME_SHARE = 0.05


class DiskGuard:
    """Daemon methods of the disk guard (self: a daemon.Daemon; state set up in its __init__)."""

    def _put_back(self, rec: Recording, task: Task, exc: BaseException) -> None:
        """A write failed for lack of space: the task goes back to the queue as it was (not failed, not a crash),
        its work files go, and the daemon pauses like the free-space guard until space returns."""
        self._drop_job()
        shutil.rmtree(self.settings.tmp_dir / f"rec-{rec.id}", ignore_errors=True)
        try:
            self.ledger.requeue_task(task.id)
        except Exception as again:  # the ledger itself is full: put it back once there is room
            if not disk_full(again):
                raise
            self._stranded.add(task.id)
        self._enter_disk_full(exc, f"working on {rec.name} x {task.template_name}")

    def _enter_disk_full(self, exc: BaseException, doing: str) -> None:
        try:
            free = self.free_mb()
            total = shutil.disk_usage(self.settings.var_dir).total / 2**20
        except OSError:
            free, total = 0.0, float("inf")
        self._full_margin = min(DISK_FULL_RESUME_MB, DISK_FULL_RESUME_SHARE * total)
        if self._full_at is None:
            self._disk_logged = -1e9  # a new pause: said at once, then at most once a minute
        self._full_at = free if self._full_at is None else min(self._full_at, free)
        self._full_why = f"disk full while {doing}: {getattr(exc, 'strerror', None) or exc}"
        self.check_disk()

    def _after_disk_pause(self) -> None:
        """Worker thread, once space is back: tasks the full ledger kept 'running' go back to the queue and
        recordings whose filing failed are filed."""
        for tid in sorted(self._stranded):
            self.ledger.requeue_task(tid)
            self._stranded.discard(tid)
        for rec in self.ledger.unfinished_recordings():
            with log_context(recording_id=rec.id):
                self.finalise(rec.id)
        self._resume_pending = False

    def free_mb(self) -> float:
        return shutil.disk_usage(self.settings.var_dir).free / 2**20

    def check_disk(self) -> bool:
        """True (and an error at most once a minute) while free space in var/ is below HEYGEM_MIN_FREE_MB."""
        try:
            free_mb = self.free_mb()
        except OSError:
            return False
        if self._full_at is not None and free_mb >= self._full_at + self._full_margin:
            self._full_at = None
        low = free_mb < self.settings.min_free_mb or self._full_at is not None
        now = time.monotonic()
        if low and now - self._disk_logged >= DISK_LOG_EVERY_S:
            self._disk_logged = now
            full = self._full_at is not None
            self.log.error("disk_low", free_mb=round(free_mb), min_free_mb=self.settings.min_free_mb,
                           path=str(self.settings.var_dir),
                           reason=self._full_why if full else "free space below HEYGEM_MIN_FREE_MB",
                           resumes_at_free_mb=round(self._full_at + self._full_margin) if full else
                           self.settings.min_free_mb,
                           fix="free space; queued tasks wait (nothing is failed) and resume by themselves")
        if self._disk_low and not low:
            self.log.info("disk_ok", free_mb=round(free_mb))
            self._resume_pending = True
        self._disk_low = low
        return low
