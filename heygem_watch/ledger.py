"""The ledger: SQLite (WAL) record of every recording and every (recording x template) task.

Shared by the daemon and the web dashboard (separate processes): every write is a short `BEGIN IMMEDIATE`
transaction and readers never block writers (WAL). Times are Unix seconds (float); `day` is the local date
a recording arrived, which is also the dated folder it is filed under.

States
    recording: queued -> running -> done | partial (some templates failed) | failed
    task:      queued -> running -> done | failed      (running -> queued on shutdown or after a crash)

A task counts its clean stops (SIGTERM, disk full: `stops`) apart from its crashes (left running by a process
that died: `crashes`); only crashes can fail it. Known content dropped again, `retry` and `rerun` extend the
recording they match (failed tasks re-queued, missing templates added) instead of making a new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

BUSY_TIMEOUT_MS = 15_000  # another process (the web dashboard) may hold the write lock briefly
MAX_ATTEMPTS = 3  # a task interrupted this many times (crash loop, OOM kill) is failed instead of re-queued
WORKER_LOST_S = 10.0  # farm workers send a Celery heartbeat every 2 s; silent this long = gone
FINGERPRINT_CHUNK = 1 << 20  # bytes read at a time while hashing
HEARTBEAT_EVERY_S = 10.0  # the daemon writes its heartbeat this often
HEARTBEAT_STALE_S = 60.0  # no heartbeat for this long: the renderer counts as not running
RENDERER = "renderer"  # heartbeat name of `heygem-watch run`; other renderers use names starting with it

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
    timings              TEXT NOT NULL DEFAULT '{}',
    crashes              INTEGER NOT NULL DEFAULT 0,
    stops                INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state, id);
CREATE INDEX IF NOT EXISTS tasks_recording ON tasks(recording_id);
CREATE TABLE IF NOT EXISTS heartbeats (
    name       TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    host       TEXT NOT NULL,
    started_at REAL NOT NULL,
    beat_at    REAL NOT NULL,
    stopped_at REAL
);
CREATE TABLE IF NOT EXISTS workers (
    hostname       TEXT PRIMARY KEY,
    first_seen     REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    state          TEXT NOT NULL DEFAULT 'online',
    active         INTEGER NOT NULL DEFAULT 0,
    processed      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    recording_id INTEGER,
    kind         TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '{}',
    created_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS file_fingerprints (
    path        TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    inode       INTEGER NOT NULL,
    fingerprint TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS template_checks (
    fingerprint TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    path        TEXT NOT NULL,
    usable      INTEGER NOT NULL,
    reason      TEXT,
    checked_at  REAL NOT NULL
);
"""
# columns added after the first release: (table, column, definition), added to older ledgers at open
MIGRATIONS = (("tasks", "crashes", "INTEGER NOT NULL DEFAULT 0"), ("tasks", "stops", "INTEGER NOT NULL DEFAULT 0"),
              # the render farm (dispatch.py): the Celery id (the same for every delivery of the task), when the
              # broker accepted it (NULL = not sent yet), the worker that renders or rendered it
              ("tasks", "celery_id", "TEXT"), ("tasks", "dispatched_at", "REAL"), ("tasks", "worker", "TEXT"))


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
    crashes: int = 0  # times the process died while rendering it
    stops: int = 0  # times it was put back cleanly (SIGTERM, disk full)
    celery_id: str | None = None  # farm: the Celery task id (the same for every delivery of this task)
    dispatched_at: float | None = None  # farm: when the broker accepted it; None = not sent (yet)
    worker: str | None = None  # farm: the worker rendering (or that rendered) it


@dataclass
class Worker:
    hostname: str
    first_seen: float
    last_heartbeat: float
    state: str  # online | offline (said goodbye)
    active: int  # tasks it is running, as it last said
    processed: int


@dataclass
class AddResult:
    recording_id: int
    duplicate_of: int | None  # the earlier recording with the same content
    task_ids: list[int]  # tasks queued by this call (for a duplicate: failed ones re-queued, missing templates)
    existing: list[str] = field(default_factory=list)  # duplicate: templates it already had (done or pending)
    prev_state: str | None = None  # duplicate: the earlier recording's state before this call


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


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
            for table, col, decl in MIGRATIONS:
                cols = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if col not in cols:
                    try:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
                    except sqlite3.OperationalError:  # another process added it meanwhile
                        pass
            self._db.execute("CREATE INDEX IF NOT EXISTS tasks_celery ON tasks(celery_id)")

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

        Content already known (and not failed) -> duplicate_of names the earlier recording, which is extended
        instead: its failed tasks among these templates are re-queued and templates it never had are added
        (task_ids); done and pending ones are listed in `existing`. A finished recording extended this way takes
        `path` as its new source. A 'duplicate' event is recorded. A recording that failed as a whole may be
        dropped again: that is a new recording.
        """
        path = Path(path)
        now = time.time()
        day = day or time.strftime("%Y-%m-%d", time.localtime(now))
        with self._write() as db:
            prev = db.execute("SELECT id, state FROM recordings WHERE fingerprint=? AND state!='failed'"
                              " ORDER BY id LIMIT 1", (fingerprint,)).fetchone()
            if prev is not None:
                src = str(path) if prev["state"] in ("done", "partial") else None
                ids, existing = self._extend(db, prev["id"], templates, src, retry_failed=True)
                db.execute("INSERT INTO events(recording_id, kind, detail, created_at) VALUES (?,?,?,?)",
                           (prev["id"], "duplicate", json.dumps({"path": str(path), "source": source, "batch": batch,
                                                                 "queued": ids, "existing": existing}), now))
                return AddResult(prev["id"], prev["id"], ids, existing, prev["state"])
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

    def _extend(self, db, rid: int, templates: list[tuple[str, str]], source_path: str | None,
                retry_failed: bool) -> tuple[list[int], list[str]]:
        """Inside a write transaction: queue what recording rid lacks of `templates` (by template fingerprint),
        re-queue its failed tasks among them when retry_failed. Returns (task ids queued, template names it
        already had). When anything was queued a finished recording reads as queued again."""
        now = time.time()
        have = {r["template_fingerprint"]: r for r in
                db.execute("SELECT * FROM tasks WHERE recording_id=? ORDER BY id", (rid,)).fetchall()}
        ids, existing = [], []
        for tpath, tfp in dict((fp, (p, fp)) for p, fp in templates).values():
            row = have.get(tfp)
            if row is None:
                c = db.execute("INSERT INTO tasks(recording_id, template_path, template_name, template_fingerprint,"
                               " state, created_at) VALUES (?,?,?,?,?,?)",
                               (rid, str(tpath), Path(tpath).name, tfp, "queued", now))
                ids.append(int(c.lastrowid))
            elif row["state"] == "failed" and retry_failed:
                db.execute("UPDATE tasks SET state='queued', error=NULL, finished_at=NULL, started_at=NULL,"
                           " progress_done=0, eta_s=NULL, crashes=0, stops=0, template_path=? WHERE id=?",
                           (str(tpath), row["id"]))
                ids.append(int(row["id"]))
            else:
                existing.append(row["template_name"])
        if ids:
            db.execute("UPDATE recordings SET state=CASE WHEN state='running' THEN 'running' ELSE 'queued' END,"
                       " error=NULL, finished_at=NULL, source_path=COALESCE(?, source_path) WHERE id=?",
                       (source_path, rid))
        return ids, existing

    def extend_recording(self, recording_id: int, templates: list[tuple[str, str]], *,
                         source_path: os.PathLike | str | None = None, retry_failed: bool = False,
                         kind: str = "rerun") -> tuple[list[int], list[str]]:
        """`rerun`: queue the (recording x template) tasks that do not exist yet (and, with retry_failed, failed
        ones again), rendering from source_path (where the source was filed). Returns (queued ids, existing)."""
        with self._write() as db:
            ids, existing = self._extend(db, recording_id, templates,
                                         str(source_path) if source_path is not None else None, retry_failed)
            db.execute("INSERT INTO events(recording_id, kind, detail, created_at) VALUES (?,?,?,?)",
                       (recording_id, kind, json.dumps({"queued": ids, "existing": existing}), time.time()))
            return ids, existing

    def retry_failed(self, recording_id: int, source_path: os.PathLike | str | None = None) -> list[int]:
        """Re-queue every failed task of a recording (done ones stay done). Returns their ids."""
        with self._write() as db:
            rows = db.execute("SELECT template_path, template_fingerprint FROM tasks WHERE recording_id=? AND"
                              " state='failed'", (recording_id,)).fetchall()
            ids, _ = self._extend(db, recording_id, [(r[0], r[1]) for r in rows],
                                  str(source_path) if source_path is not None else None, True)
            db.execute("INSERT INTO events(recording_id, kind, detail, created_at) VALUES (?,?,?,?)",
                       (recording_id, "retry", json.dumps({"queued": ids}), time.time()))
            return ids

    def add_follower(self, recording_id: int, path: os.PathLike | str) -> None:
        """A copy of a recording still being processed: filed like it once it is finished."""
        self.add_event(recording_id, "follower", path=str(path))

    def followers(self, recording_id: int) -> list[str]:
        rows = self._query("SELECT detail FROM events WHERE recording_id=? AND kind='follower' ORDER BY id",
                           (recording_id,))
        return list(dict.fromkeys(json.loads(r[0])["path"] for r in rows))

    def find_recording(self, ref: str) -> Recording | None:
        """A recording by id ("42", "#42") or by file name (with or without extension; the latest such)."""
        ref = ref.strip()
        if ref.lstrip("#").isdigit():
            rows = self._query("SELECT * FROM recordings WHERE id=?", (int(ref.lstrip("#")),))
            if rows:
                return _recording(rows[0])
        rows = self._query("SELECT * FROM recordings WHERE name=? ORDER BY id DESC LIMIT 1", (ref,))
        if not rows:
            rows = self._query("SELECT * FROM recordings ORDER BY id DESC")
            rows = [r for r in rows if Path(r["name"]).stem == ref][:1]
        return _recording(rows[0]) if rows else None

    # -- fingerprints and template checks ----------------------------------------------------------------------
    def known_fingerprint(self, path: os.PathLike | str, st: os.stat_result) -> str | None:
        """The fingerprint remembered for this path while its size, mtime and inode are unchanged."""
        rows = self._query("SELECT fingerprint FROM file_fingerprints WHERE path=? AND size=? AND mtime_ns=? AND"
                           " inode=?", (str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        return rows[0][0] if rows else None

    def remember_fingerprint(self, path: os.PathLike | str, st: os.stat_result, fingerprint: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO file_fingerprints(path, size, mtime_ns, inode, fingerprint)"
                       " VALUES (?,?,?,?,?)", (str(path), st.st_size, st.st_mtime_ns, st.st_ino, fingerprint))

    def forget_fingerprints(self, keep) -> None:
        """Drop remembered fingerprints of paths for which keep(path) is False (files gone)."""
        gone = [r[0] for r in self._query("SELECT path FROM file_fingerprints") if not keep(r[0])]
        if gone:
            with self._write() as db:
                db.executemany("DELETE FROM file_fingerprints WHERE path=?", [(p,) for p in gone])

    def set_template_check(self, fingerprint: str, path: os.PathLike | str, usable: bool,
                           reason: str | None = None) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO template_checks(fingerprint, name, path, usable, reason, checked_at)"
                       " VALUES (?,?,?,?,?,?)", (fingerprint, Path(path).name, str(path), int(bool(usable)), reason,
                                                 time.time()))

    def template_checks(self) -> dict[str, dict]:
        """fingerprint -> {name, path, usable, reason, checked_at} of every template checked so far."""
        return {r["fingerprint"]: {k: r[k] for k in r.keys()} | {"usable": bool(r["usable"])}
                for r in self._query("SELECT * FROM template_checks")}

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

    def queued_tasks(self, limit: int = 500) -> list[dict]:
        """The queue in the order it runs: task_id, recording_id, recording (name), template, batch."""
        rows = self._query("SELECT t.id AS task_id, r.id AS recording_id, r.name AS recording, t.template_name AS"
                           " template, r.batch AS batch FROM tasks t JOIN recordings r ON r.id=t.recording_id"
                           " WHERE t.state='queued' ORDER BY t.id LIMIT ?", (limit,))
        return [dict(r) for r in rows]

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
        """Back to the queue after a clean stop (shutdown mid-render, disk full): counted in `stops`, never as a
        crash; keeps its place, since order is by id."""
        with self._write() as db:
            db.execute("UPDATE tasks SET state='queued', started_at=NULL, progress_done=0, fps=0, eta_s=NULL,"
                       " stops=stops+1 WHERE id=? AND state='running'", (task_id,))
            db.execute(self._UNSTART)

    def requeue_running(self) -> int:
        """At start-up: tasks left 'running' by a crash go back to the queue (finished ones are never redone).
        A task whose renders killed the process MAX_ATTEMPTS times is failed instead, so a file that kills the
        process cannot loop; clean stops (requeue_task) do not count.
        Farm tasks (a Celery id) are not touched: a worker renders them, the head re-attaches (dispatch.py)."""
        now = time.time()
        with self._write() as db:
            db.execute("UPDATE tasks SET crashes=crashes+1 WHERE state='running' AND celery_id IS NULL")
            db.execute("UPDATE tasks SET state='failed', finished_at=?, error='interrupted by ' || crashes || ' crash(es)"
                       " (the process died while rendering it); ' || stops || ' clean stop(s) by a shutdown or a"
                       " full disk were not counted' WHERE state='running' AND crashes>=? AND celery_id IS NULL",
                       (now, MAX_ATTEMPTS))
            cur = db.execute("UPDATE tasks SET state='queued', started_at=NULL, progress_done=0, fps=0, eta_s=NULL"
                             " WHERE state='running' AND celery_id IS NULL")
            n = int(cur.rowcount)
            db.execute(self._UNSTART)
            return n

    # -- heartbeat --------------------------------------------------------------------------------------------
    def beat(self, name: str = RENDERER) -> None:
        """A renderer says it is alive (every HEARTBEAT_EVERY_S); the first beat of a process sets started_at."""
        now, pid = time.time(), os.getpid()
        with self._write() as db:
            db.execute("INSERT INTO heartbeats(name, pid, host, started_at, beat_at) VALUES (?,?,?,?,?)"
                       " ON CONFLICT(name) DO UPDATE SET beat_at=excluded.beat_at, stopped_at=NULL,"
                       " started_at=CASE WHEN heartbeats.pid=excluded.pid AND heartbeats.stopped_at IS NULL"
                       " THEN heartbeats.started_at ELSE excluded.started_at END, pid=excluded.pid, host=excluded.host",
                       (name, pid, socket.gethostname(), now, now))

    def beat_stopped(self, name: str = RENDERER) -> None:
        """A clean stop: the renderer is not running from now on (no need to wait until the beat is stale)."""
        with self._write() as db:
            db.execute("UPDATE heartbeats SET stopped_at=? WHERE name=?", (time.time(), name))

    def renderer_status(self) -> dict:
        """{running, since, pid, host, last_beat, message}: running while some renderer beat within
        HEARTBEAT_STALE_S and did not stop; since = when it started, or when it was last seen alive."""
        now = time.time()
        rows = self._query("SELECT * FROM heartbeats WHERE name=? OR name LIKE ? ORDER BY beat_at DESC",
                           (RENDERER, RENDERER + "@%"))
        alive = [r for r in rows if r["stopped_at"] is None and now - r["beat_at"] <= HEARTBEAT_STALE_S]
        if alive:
            r = alive[0]
            return {"running": True, "since": r["started_at"], "pid": r["pid"], "host": r["host"],
                    "last_beat": r["beat_at"], "message": f"renderer running (pid {r['pid']} on {r['host']}, "
                    f"since {_local(r['started_at'])})"}
        if not rows:
            return {"running": False, "since": None, "pid": None, "host": None, "last_beat": None,
                    "message": "renderer not running (never started on this var/): start `heygem-watch run`"}
        r = rows[0]
        since = r["stopped_at"] if r["stopped_at"] is not None else r["beat_at"]
        how = "stopped" if r["stopped_at"] is not None else "last heartbeat"
        return {"running": False, "since": since, "pid": r["pid"], "host": r["host"], "last_beat": r["beat_at"],
                "message": f"renderer not running since {_local(since)} ({how}; pid {r['pid']} on {r['host']})"}

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

    # -- render farm (dispatch.py; the head is the only writer) ------------------------------------------------
    def undispatched(self, limit: int = 100) -> list[Task]:
        """Queued tasks not handed to the broker yet (no Celery id), oldest first."""
        return [_task(r) for r in self._query("SELECT * FROM tasks WHERE state='queued' AND celery_id IS NULL"
                                              " ORDER BY id LIMIT ?", (limit,))]

    def assign_celery_id(self, task_id: int, celery_id: str) -> None:
        """Before sending: a head that dies between this and the send sends the same id again on restart."""
        with self._write() as db:
            db.execute("UPDATE tasks SET celery_id=?, dispatched_at=NULL WHERE id=? AND state='queued'",
                       (celery_id, task_id))

    def mark_dispatched(self, task_id: int) -> None:
        with self._write() as db:
            db.execute("UPDATE tasks SET dispatched_at=? WHERE id=?", (time.time(), task_id))

    def in_flight(self) -> list[Task]:
        """Farm tasks with a Celery id that have not finished: in the broker or on a worker."""
        return [_task(r) for r in self._query("SELECT * FROM tasks WHERE celery_id IS NOT NULL AND state IN"
                                              " ('queued','running') ORDER BY id")]

    def mark_remote_progress(self, task_id: int, worker: str | None, delivery: int, done: int, total: int,
                             fps: float, eta_s: float | None) -> None:
        """A worker started (or reports on) a farm task: running there, attempts = its delivery number."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT recording_id, state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None or row["state"] not in ("queued", "running"):
                return
            db.execute("UPDATE tasks SET state='running', worker=COALESCE(?, worker), attempts=MAX(attempts, ?),"
                       " started_at=COALESCE(started_at, ?), progress_done=?, progress_total=?, fps=?, eta_s=?"
                       " WHERE id=?", (worker, int(delivery), now, int(done), int(total), float(fps),
                                       None if eta_s is None else float(eta_s), task_id))
            db.execute("UPDATE recordings SET state='running' WHERE id=? AND state='queued'", (row["recording_id"],))

    def requeue_remote(self, task_id: int) -> None:
        """A farm task whose worker died: back to queued (same Celery id) until another worker reports on it."""
        with self._write() as db:
            db.execute("UPDATE tasks SET state='queued', worker=NULL, started_at=NULL, progress_done=0, fps=0,"
                       " eta_s=NULL WHERE id=? AND state='running'", (task_id,))
            db.execute(self._UNSTART)

    def set_delivery(self, task_id: int, worker: str | None, attempts: int) -> None:
        """A farm task's outcome came in: the worker that rendered it and its delivery count (attempts)."""
        with self._write() as db:
            db.execute("UPDATE tasks SET worker=COALESCE(?, worker), attempts=MAX(attempts, ?) WHERE id=?",
                       (worker, int(attempts), task_id))

    def worker_seen(self, hostname: str, *, state: str = "online", active: int | None = None,
                    processed: int | None = None, at: float | None = None) -> None:
        now = at or time.time()
        with self._write() as db:
            db.execute("INSERT INTO workers(hostname, first_seen, last_heartbeat, state, active, processed)"
                       " VALUES (?,?,?,?,?,?) ON CONFLICT(hostname) DO UPDATE SET"
                       " last_heartbeat=excluded.last_heartbeat, state=excluded.state,"
                       " active=COALESCE(?, active), processed=COALESCE(?, processed)",
                       (hostname, now, now, state, active or 0, processed or 0, active, processed))

    def workers(self) -> list[Worker]:
        return [Worker(**{k: r[k] for k in r.keys()})
                for r in self._query("SELECT * FROM workers ORDER BY hostname")]

    def workers_status(self) -> list[dict]:
        """Farm workers for `status` and the dashboard: online | lost (no heartbeat for WORKER_LOST_S) | offline
        (said goodbye), last heartbeat, tasks processed, the task it renders now."""
        now = time.time()
        current = {t.worker: t for t in self.running_tasks() if t.worker}
        out = []
        for w in self.workers():
            ago = max(0.0, now - w.last_heartbeat)
            t = current.get(w.hostname)
            out.append({"hostname": w.hostname, "last_heartbeat": w.last_heartbeat, "ago_s": round(ago, 1),
                        "state": w.state if w.state == "offline" else ("lost" if ago > WORKER_LOST_S else "online"),
                        "processed": w.processed,
                        "task": {"id": t.id, "recording_id": t.recording_id, "template": t.template_name,
                                 "done": t.progress_done, "total": t.progress_total} if t else None})
        return out
