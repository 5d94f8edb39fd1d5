"""The ledger: SQLite (WAL) record of every recording and every (recording x template) task.

Shared by the daemon and the web dashboard (separate processes): every write is a short `BEGIN IMMEDIATE`
transaction and readers never block writers (WAL). Times are Unix seconds (float); `day` is the local date
a recording arrived, which is also the dated folder it is filed under.

States
    recording: queued -> running -> done | partial (some templates failed) | failed
    task:      queued -> running -> done | failed      (running -> queued on shutdown or after a crash)
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

BUSY_TIMEOUT_MS = 15_000  # another process (the web dashboard) may hold the write lock briefly
MAX_ATTEMPTS = 3  # a task interrupted this many times (crash loop, OOM kill) is failed instead of re-queued
FINGERPRINT_CHUNK = 1 << 20  # bytes read at a time while hashing

RECORDING_STATES = ("queued", "running", "done", "partial", "failed")
TASK_STATES = ("queued", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS recordings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    name        TEXT NOT NULL,
    source_path TEXT NOT NULL,
    size        INTEGER NOT NULL,
    source      TEXT NOT NULL DEFAULT 'watch',
    batch       TEXT,
    state       TEXT NOT NULL DEFAULT 'queued',
    created_at  REAL NOT NULL,
    finished_at REAL,
    day         TEXT NOT NULL,
    output_dir  TEXT NOT NULL,
    error       TEXT,
    final_path  TEXT
);
CREATE INDEX IF NOT EXISTS recordings_fp ON recordings(fingerprint);
CREATE INDEX IF NOT EXISTS recordings_batch ON recordings(batch);
CREATE TABLE IF NOT EXISTS tasks (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    recording_id         INTEGER NOT NULL REFERENCES recordings(id),
    template_path        TEXT NOT NULL,
    template_name        TEXT NOT NULL,
    template_fingerprint TEXT NOT NULL,
    state                TEXT NOT NULL DEFAULT 'queued',
    attempts             INTEGER NOT NULL DEFAULT 0,
    error                TEXT,
    output_path          TEXT,
    progress_done        INTEGER NOT NULL DEFAULT 0,
    progress_total       INTEGER NOT NULL DEFAULT 0,
    fps                  REAL NOT NULL DEFAULT 0,
    eta_s                REAL,
    created_at           REAL NOT NULL,
    started_at           REAL,
    finished_at          REAL,
    timings              TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state, id);
CREATE INDEX IF NOT EXISTS tasks_recording ON tasks(recording_id);
CREATE TABLE IF NOT EXISTS events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    recording_id INTEGER,
    kind         TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '{}',
    created_at   REAL NOT NULL
);
"""


def fingerprint_file(path: os.PathLike | str) -> str:
    """blake2b (160 bit) of the whole content, hex; streamed, so a 2-hour recording costs no memory."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while True:
            b = f.read(FINGERPRINT_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class Recording:
    id: int
    fingerprint: str
    name: str
    source_path: str
    size: int
    source: str
    batch: str | None
    state: str
    created_at: float
    finished_at: float | None
    day: str  # YYYY-MM-DD (local date of arrival)
    output_dir: str
    error: str | None
    final_path: str | None  # where the source file ended up (archive/failed), None while in incoming


@dataclass
class Task:
    id: int
    recording_id: int
    template_path: str
    template_name: str
    template_fingerprint: str
    state: str
    attempts: int
    error: str | None
    output_path: str | None
    progress_done: int
    progress_total: int
    fps: float
    eta_s: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict = field(default_factory=dict)


@dataclass
class AddResult:
    recording_id: int
    duplicate_of: int | None  # the earlier recording with the same content; no new tasks then
    task_ids: list[int]


def _recording(row: sqlite3.Row) -> Recording:
    return Recording(**{k: row[k] for k in row.keys()})


def _task(row: sqlite3.Row) -> Task:
    d = {k: row[k] for k in row.keys()}
    d["timings"] = json.loads(d["timings"] or "{}")
    return Task(**d)


class Ledger:
    """One connection per Ledger, usable from any thread of this process (serialised by a lock)."""

    def __init__(self, db_path: os.PathLike | str):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._db.execute("PRAGMA foreign_keys=ON")
        # executescript commits on its own, so the schema goes in outside the transaction helper
        with self._lock:
            self._db.executescript(SCHEMA)

    # -- plumbing ---------------------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, ledger: "Ledger"):
            self.l = ledger

        def __enter__(self):
            self.l._lock.acquire()
            try:
                self.l._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.l._lock.release()
                raise
            return self.l._db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.l._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.l._lock.release()

    def _write(self) -> "Ledger._Tx":
        return Ledger._Tx(self)

    def _query(self, sql: str, args: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- recordings -------------------------------------------------------------------------------------------
    def add_recording(self, path: os.PathLike | str, fingerprint: str, size: int, templates: list[tuple[str, str]],
                      *, source: str = "watch", batch: str | None = None, output_dir: os.PathLike | str,
                      day: str | None = None) -> AddResult:
        """Record a recording and queue one task per (template path, template fingerprint).

        Content already known (and not failed) -> nothing new is queued; a 'duplicate' event is recorded and
        duplicate_of names the earlier recording. A recording that failed before may be dropped again to retry.
        """
        path = Path(path)
        now = time.time()
        day = day or time.strftime("%Y-%m-%d", time.localtime(now))
        with self._write() as db:
            prev = db.execute("SELECT id FROM recordings WHERE fingerprint=? AND state!='failed' ORDER BY id LIMIT 1",
                              (fingerprint,)).fetchone()
            if prev is not None:
                db.execute("INSERT INTO events(recording_id, kind, detail, created_at) VALUES (?,?,?,?)",
                           (prev["id"], "duplicate", json.dumps({"path": str(path), "source": source, "batch": batch}),
                            now))
                return AddResult(prev["id"], prev["id"], [])
            cur = db.execute(
                "INSERT INTO recordings(fingerprint, name, source_path, size, source, batch, state, created_at, day,"
                " output_dir) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (fingerprint, path.name, str(path), int(size), source, batch, "queued", now, day, str(output_dir)))
            rid = int(cur.lastrowid)
            ids = []
            for tpath, tfp in templates:
                c = db.execute("INSERT INTO tasks(recording_id, template_path, template_name, template_fingerprint,"
                               " state, created_at) VALUES (?,?,?,?,?,?)",
                               (rid, str(tpath), Path(tpath).name, tfp, "queued", now))
                ids.append(int(c.lastrowid))
            db.execute("INSERT INTO events(recording_id, kind, detail, created_at) VALUES (?,?,?,?)",
                       (rid, "added", json.dumps({"path": str(path), "source": source, "tasks": len(ids)}), now))
            return AddResult(rid, None, ids)

    def find_by_fingerprint(self, fingerprint: str) -> Recording | None:
        """The earliest non-failed recording with this content (else the latest failed one), or None."""
        rows = self._query("SELECT * FROM recordings WHERE fingerprint=? ORDER BY (state='failed'), id LIMIT 1",
                           (fingerprint,))
        return _recording(rows[0]) if rows else None

    def recording(self, recording_id: int) -> Recording:
        rows = self._query("SELECT * FROM recordings WHERE id=?", (recording_id,))
        if not rows:
            raise KeyError(f"no recording {recording_id}")
        return _recording(rows[0])

    def recordings_in_batch(self, batch: str) -> list[Recording]:
        return [_recording(r) for r in self._query("SELECT * FROM recordings WHERE batch=? ORDER BY id", (batch,))]

    def recent_recordings(self, limit: int = 20) -> list[Recording]:
        return [_recording(r) for r in self._query("SELECT * FROM recordings ORDER BY id DESC LIMIT ?", (limit,))]

    def output_dir_in_use(self, output_dir: os.PathLike | str) -> bool:
        return bool(self._query("SELECT 1 FROM recordings WHERE output_dir=? LIMIT 1", (str(output_dir),)))

    def set_recording_state(self, recording_id: int, state: str, error: str | None = None,
                            final_path: os.PathLike | str | None = None) -> None:
        if state not in RECORDING_STATES:
            raise ValueError(f"unknown recording state {state!r}")
        finished = time.time() if state in ("done", "partial", "failed") else None
        with self._write() as db:
            db.execute("UPDATE recordings SET state=?, error=COALESCE(?, error), finished_at=?,"
                       " final_path=COALESCE(?, final_path) WHERE id=?",
                       (state, error, finished, str(final_path) if final_path is not None else None, recording_id))

    def unfinished_recordings(self) -> list[Recording]:
        """Recordings whose tasks are all finished but which were never filed (a crash between the two)."""
        rows = self._query("SELECT r.* FROM recordings r WHERE r.state IN ('queued','running') AND NOT EXISTS"
                           " (SELECT 1 FROM tasks t WHERE t.recording_id=r.id AND t.state IN ('queued','running'))"
                           " ORDER BY r.id")
        return [_recording(r) for r in rows]

    def add_event(self, recording_id: int | None, kind: str, **detail) -> None:
        with self._write() as db:
            db.execute("INSERT INTO events(recording_id, kind, detail, created_at) VALUES (?,?,?,?)",
                       (recording_id, kind, json.dumps(detail, default=str), time.time()))

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict]:
        sql, args = "SELECT * FROM events", []
        if kind:
            sql, args = sql + " WHERE kind=?", [kind]
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", [*args, limit])
        return [dict(r, detail=json.loads(r["detail"])) for r in rows]

    # -- tasks ------------------------------------------------------------------------------------------------
    def claim_next_task(self) -> Task | None:
        """The oldest queued task, now running (attempts + 1); None when the queue is empty."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT id, recording_id FROM tasks WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE tasks SET state='running', attempts=attempts+1, started_at=?, error=NULL,"
                       " progress_done=0, fps=0, eta_s=NULL WHERE id=?", (now, row["id"]))
            db.execute("UPDATE recordings SET state='running' WHERE id=? AND state='queued'", (row["recording_id"],))
            return _task(db.execute("SELECT * FROM tasks WHERE id=?", (row["id"],)).fetchone())

    def task(self, task_id: int) -> Task:
        rows = self._query("SELECT * FROM tasks WHERE id=?", (task_id,))
        if not rows:
            raise KeyError(f"no task {task_id}")
        return _task(rows[0])

    def tasks_for(self, recording_id: int) -> list[Task]:
        return [_task(r) for r in self._query("SELECT * FROM tasks WHERE recording_id=? ORDER BY id", (recording_id,))]

    def pending_template_fingerprints(self) -> set[str]:
        """Fingerprints of the templates that queued or running tasks still need."""
        return {r[0] for r in self._query("SELECT DISTINCT template_fingerprint FROM tasks "
                                          "WHERE state IN ('queued', 'running')")}

    def running_tasks(self) -> list[Task]:
        return [_task(r) for r in self._query("SELECT * FROM tasks WHERE state='running' ORDER BY id")]

    def queue_position(self, task_id: int) -> int:
        """1 = next to run; 0 when the task is not queued."""
        rows = self._query("SELECT state FROM tasks WHERE id=?", (task_id,))
        if not rows or rows[0]["state"] != "queued":
            return 0
        return int(self._query("SELECT COUNT(*) FROM tasks WHERE state='queued' AND id<=?", (task_id,))[0][0])

    def update_progress(self, task_id: int, done: int, total: int, fps: float, eta_s: float | None) -> None:
        with self._write() as db:
            db.execute("UPDATE tasks SET progress_done=?, progress_total=?, fps=?, eta_s=? WHERE id=?",
                       (int(done), int(total), float(fps), None if eta_s is None else float(eta_s), task_id))

    def finish_task(self, task_id: int, output_path: os.PathLike | str, timings: dict) -> None:
        with self._write() as db:
            db.execute("UPDATE tasks SET state='done', output_path=?, timings=?, finished_at=?, error=NULL,"
                       " eta_s=0, progress_done=MAX(progress_done, progress_total) WHERE id=?",
                       (str(output_path), json.dumps(timings, default=str), time.time(), task_id))

    def fail_task(self, task_id: int, error: str, timings: dict | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE tasks SET state='failed', error=?, finished_at=?, eta_s=NULL,"
                       " timings=COALESCE(?, timings) WHERE id=?",
                       (str(error), time.time(), json.dumps(timings, default=str) if timings else None, task_id))

    def fail_queued_for(self, recording_id: int, error: str) -> int:
        """Fail every queued task of a recording at once (the recording itself is unusable)."""
        with self._write() as db:
            cur = db.execute("UPDATE tasks SET state='failed', error=?, finished_at=? WHERE recording_id=?"
                             " AND state='queued'", (str(error), time.time(), recording_id))
            return int(cur.rowcount)

    _UNSTART = ("UPDATE recordings SET state='queued' WHERE state='running' AND NOT EXISTS (SELECT 1 FROM tasks t"
                " WHERE t.recording_id=recordings.id AND t.state!='queued')")

    def requeue_task(self, task_id: int) -> None:
        """Back to the queue (shutdown mid-render); keeps its place, since order is by id."""
        with self._write() as db:
            db.execute("UPDATE tasks SET state='queued', started_at=NULL, progress_done=0, fps=0, eta_s=NULL"
                       " WHERE id=? AND state='running'", (task_id,))
            db.execute(self._UNSTART)

    def requeue_running(self) -> int:
        """At start-up: tasks left 'running' by a crash go back to the queue (finished ones are never redone).
        A task already tried MAX_ATTEMPTS times is failed instead, so a file that kills the process cannot loop."""
        now = time.time()
        with self._write() as db:
            db.execute("UPDATE tasks SET state='failed', finished_at=?, error=? WHERE state='running' AND attempts>=?",
                       (now, f"interrupted {MAX_ATTEMPTS} times (the process died while rendering it)", MAX_ATTEMPTS))
            cur = db.execute("UPDATE tasks SET state='queued', started_at=NULL, progress_done=0, fps=0, eta_s=NULL"
                             " WHERE state='running'")
            n = int(cur.rowcount)
            db.execute(self._UNSTART)
            return n

    def counts(self) -> dict[str, int]:
        """Tasks per state (every state present, 0 when none)."""
        out = {s: 0 for s in TASK_STATES}
        for r in self._query("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state"):
            out[r["state"]] = int(r["n"])
        return out

    def recording_counts(self) -> dict[str, int]:
        out = {s: 0 for s in RECORDING_STATES}
        for r in self._query("SELECT state, COUNT(*) AS n FROM recordings GROUP BY state"):
            out[r["state"]] = int(r["n"])
        return out
