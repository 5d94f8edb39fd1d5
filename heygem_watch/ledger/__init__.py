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

import json
import os
import time
from pathlib import Path

from heygem_watch.ledger.farm import (HEARTBEAT_EVERY_S, HEARTBEAT_STALE_S, RENDERER, WORKER_LOST_S,  # noqa: F401
                                      Renderers)
from heygem_watch.ledger.fingerprints import FINGERPRINT_CHUNK, FingerprintMemo, fingerprint_file  # noqa: F401
from heygem_watch.ledger.store import (BUSY_TIMEOUT_MS, MIGRATIONS, RECORDING_STATES, SCHEMA,  # noqa: F401
                                       TASK_STATES, AddResult, Recording, Store, Task, Worker, _recording, _task)

MAX_ATTEMPTS = 3  # a task interrupted this many times (crash loop, OOM kill) is failed instead of re-queued


class Ledger(Renderers, FingerprintMemo, Store):
    """Recordings and their tasks: the queue. Store: the connection; FingerprintMemo, Renderers: the other tables."""

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
