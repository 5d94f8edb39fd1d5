"""`GET /api/status`, answered from a snapshot: every open dashboard asks once a second, so 200 of them must not
mean 200 ledger reads a second (measured before this: p95 4 s at 200 clients, bench/web_status.py).

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

MAX_AGE_S = 2.0  # rebuild at least this often even when nothing was written (heartbeat staleness, clocks)
QUEUE_LIMIT = 500  # queued tasks listed at most (the count is always complete)


class StatusSnapshot:
    def __init__(self, db_path: Path):
        self.db_path = Path(db_path)
        self._db = None  # a Ledger, used by the rebuilding thread (one at a time)
        self._ver = None  # a plain connection of its own for data_version, used on the event loop only
        self._body: bytes | None = None
        self._key: int | None = None
        self._built_at = -1e9
        self._rebuild: asyncio.Lock | None = None

    def _open(self) -> None:
        import sqlite3

        from heygem_watch.ledger import Ledger

        if self._db is None:
            self._db = Ledger(self.db_path)  # creates the ledger when no daemon ever ran here
        if self._ver is None:
            self._ver = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None)

    def invalidate(self) -> None:
        """This process changed the ledger (a submit, a delete): the next request rebuilds."""
        self._built_at = -1e9

    def build(self) -> dict:
        """The status as a dict (what /api/status returns); reads the ledger."""
        from heygem_watch.web.api import _jsonable

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
                "queued_total": counts["queued"], "renderer": db.renderer_status()}

    def _refresh(self, key: int) -> bytes:
        body = json.dumps(self.build(), ensure_ascii=False).encode("utf-8")
        self._body, self._key, self._built_at = body, key, time.monotonic()
        return body

    def _fresh(self, key: int) -> bool:
        return self._body is not None and key == self._key and time.monotonic() - self._built_at < MAX_AGE_S

    async def get(self) -> bytes:
        """The current status as JSON bytes."""
        from starlette.concurrency import run_in_threadpool

        if self._ver is None:
            await run_in_threadpool(self._open)
        if self._rebuild is None:
            self._rebuild = asyncio.Lock()
        key = self._ver.execute("PRAGMA data_version").fetchone()[0]
        if self._fresh(key):
            return self._body
        async with self._rebuild:  # one rebuild at a time; whoever waited reuses its result
            key = self._ver.execute("PRAGMA data_version").fetchone()[0]
            if self._fresh(key):
                return self._body
            return await run_in_threadpool(self._refresh, key)

    def close(self) -> None:
        for c in (self._db, self._ver):
            if c is not None:
                c.close()
        self._db = self._ver = None
