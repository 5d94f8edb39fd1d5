"""Who renders: the renderer's heartbeat (`heygem-watch run`, read by `status` and the dashboard) and the render
farm (dispatch.py): Celery ids and deliveries of farm tasks, and the workers' own heartbeats. The head is the only
writer of the farm columns."""
from __future__ import annotations

import os
import socket
import time

from heygem_watch.ledger.store import Task, Worker, _local, _task

WORKER_LOST_S = 10.0  # farm workers send a Celery heartbeat every 2 s; silent this long = gone
HEARTBEAT_EVERY_S = 10.0  # the daemon writes its heartbeat this often
HEARTBEAT_STALE_S = 60.0  # no heartbeat for this long: the renderer counts as not running
RENDERER = "renderer"  # heartbeat name of `heygem-watch run`; other renderers use names starting with it


class Renderers:
    """Ledger methods on the heartbeats and workers tables and the farm columns of tasks (needs Store's
    _query/_write, Ledger's running_tasks and _UNSTART)."""

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

    def in_flight(self, sent: bool | None = None) -> list[Task]:
        """Farm tasks with a Celery id that have not finished: in the broker or on a worker. sent=True: only those
        whose send was confirmed, False: only those whose send was not (the head polls both ways 4 times a s)."""
        only = {None: "", True: " AND dispatched_at IS NOT NULL", False: " AND dispatched_at IS NULL"}[sent]
        return [_task(r) for r in self._query("SELECT * FROM tasks WHERE celery_id IS NOT NULL AND state IN"
                                              " ('queued','running')" + only + " ORDER BY id")]

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
