"""`GET /api/status` (and the history), answered from a snapshot: every open dashboard asks for the status once a
second and for the history every 4 s, so 200 of them must not mean 250 ledger reads a second (measured before this:
/api/status p95 1.9-4 s at 200 clients, bench/web_status.py).

The snapshot (counts, the running task, the queue, the renderer's heartbeat) is rebuilt only when the ledger changed
(SQLite's `PRAGMA data_version`, a few microseconds on a connection kept open) or is older than MAX_AGE_S (the
heartbeat goes stale with time alone). One request rebuilds, in a worker thread; concurrent ones wait for that
result instead of each reading the ledger. The answer is kept as encoded JSON bytes.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Callable

MAX_AGE_S = 2.0  # rebuild at least this often even when nothing was written (heartbeat staleness, clocks)
HISTORY_MAX_AGE_S = 4.0  # history: also shows whether output files still exist, which the ledger does not know
QUEUE_LIMIT = 500  # queued tasks listed at most (the count is always complete)


class StatusSnapshot:
    """Cached JSON answers keyed by name, each rebuilt when the ledger changed or it is older than its max age."""

    def __init__(self, db_path: Path):
        self.db_path = Path(db_path)
        self._db = None  # a Ledger for the status rebuild (one rebuild at a time)
        self._ver = None  # a plain connection of its own for data_version, used on the event loop only
        self._answers: dict[str, tuple[bytes, int, float]] = {}  # name -> (body, data_version, built at)
        self._locks: dict[str, asyncio.Lock] = {}

    def _open(self) -> None:
        import sqlite3

        from heygem_watch.ledger import Ledger

        if self._db is None:
            self._db = Ledger(self.db_path)  # creates the ledger when no daemon ever ran here
        if self._ver is None:
            self._ver = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None)

    def invalidate(self) -> None:
        """This process changed the ledger or var/ (a submit, a delete): every answer is rebuilt on next use."""
        self._answers.clear()

    def build(self) -> dict:
        """The status as a dict (what /api/status returns); reads the ledger."""
        from heygem_watch.web.results import _jsonable

        self._open()
        db = self._db
        running = []
        for t in db.running_tasks():
            r = db.recording(t.recording_id)
            ids = [x.id for x in db.tasks_for(r.id)]
            running.append({"task": _jsonable(t), "recording": {"id": r.id, "name": r.name, "batch": r.batch},
                            "k": ids.index(t.id) + 1, "n": len(ids)})  # "k of n": the batch's k-th template
        counts = db.counts()
        queued = [dict(q, position=i + 1) for i, q in enumerate(db.queued_tasks(QUEUE_LIMIT))]
        return {"counts": counts, "recording_counts": db.recording_counts(), "running": running, "queued": queued,
                "queued_total": counts["queued"], "renderer": db.renderer_status(),
                "workers": db.workers_status()}

    async def get(self) -> bytes:
        """The current status as JSON bytes."""
        return await self.cached("status", self.build, MAX_AGE_S)

    async def cached(self, name: str, build: Callable[[], dict], max_age: float) -> bytes:
        """build()'s answer as JSON bytes, rebuilt (in a worker thread, once for all waiting requests) when the
        ledger changed since, or after max_age seconds."""
        from starlette.concurrency import run_in_threadpool

        if self._ver is None:
            await run_in_threadpool(self._open)
        body = self._fresh(name, max_age)
        if body is not None:
            return body
        async with self._locks.setdefault(name, asyncio.Lock()):
            body = self._fresh(name, max_age)  # rebuilt by the request this one waited for
            if body is not None:
                return body
            version = self._version()  # read before building: a change during the build means another rebuild
            body = await run_in_threadpool(lambda: json.dumps(build(), ensure_ascii=False, default=str).encode())
            self._answers[name] = (body, version, time.monotonic())
            return body

    def _version(self) -> int:
        return self._ver.execute("PRAGMA data_version").fetchone()[0]

    def _fresh(self, name: str, max_age: float) -> bytes | None:
        got = self._answers.get(name)
        if got is not None and got[1] == self._version() and time.monotonic() - got[2] < max_age:
            return got[0]
        return None

    def close(self) -> None:
        for c in (self._db, self._ver):
            if c is not None:
                c.close()
        self._db = self._ver = None
