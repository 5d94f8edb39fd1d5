"""The ledger's database: schema and migrations, the row types, one connection with its write transactions.

Every write is a short `BEGIN IMMEDIATE` transaction and readers never block writers (WAL), so the daemon and
the web dashboard (separate processes) share one file. Ledger (ledger/__init__.py) adds the queries.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

BUSY_TIMEOUT_MS = 15_000  # another process (the web dashboard) may hold the write lock briefly
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


class Store:
    """One connection per ledger, usable from any thread of this process (serialised by a lock)."""

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
        def __init__(self, ledger: "Store"):
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

    def _write(self) -> "Store._Tx":
        return Store._Tx(self)

    def _query(self, sql: str, args: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
