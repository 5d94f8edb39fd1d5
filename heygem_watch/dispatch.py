"""Where tasks render: here (LocalDispatcher, the default) or on the farm (CeleryDispatcher, HEYGEM_DISPATCH=celery).

The daemon's worker thread calls `step()` in a loop; either way the daemon stays the only writer of the ledger.
Farm, per step:
    send      queued tasks without a Celery id: the recording's audio is extracted once into the shared
              var/tmp/rec-<id>/, the id is written to the ledger, then the message goes to Redis. The id is stored
              before the send, so a head that dies in between sends the same id again (the worker's render is
              idempotent), and a head restarted later finds every task it ever sent by that id (re-attach).
    poll      every in-flight task's state in the result backend (one MGET): PROGRESS -> running on <worker> with
              frames/fps/ETA, SUCCESS -> done (output checked on disk), FAILURE -> failed with the reason; a
              recording whose tasks all finished is filed as in local mode.
A thread listens to the workers' Celery heartbeats (worker-heartbeat/online/offline events) for `status`.
Broker down: nothing is lost; ingest goes on, sending and polling resume when Redis answers again.
"""
from __future__ import annotations

import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

SEND_BATCH = 50  # tasks sent per step at most (the poll keeps its pace meanwhile)
BROKER_RETRY_S = 2.0  # after a failed send, wait this long before trying the broker again
BROKER_LOG_EVERY_S = 60.0
PROGRESS_LOG_S = 4.0
HEARTBEAT_WRITE_S = 2.0  # a worker's heartbeat reaches the ledger at most this often
ORPHAN_GRACE_S = 5.0  # a task whose worker is gone and whose lease lapsed is sent again after this much more


def create(daemon):
    """The dispatcher HEYGEM_DISPATCH names."""
    return CeleryDispatcher(daemon) if daemon.settings.dispatch == "celery" else LocalDispatcher(daemon)


class LocalDispatcher:
    """Single box: the daemon's own engine renders the oldest queued task (unchanged behaviour)."""

    kind = "local"
    renders_here = True

    def __init__(self, daemon):
        self.daemon = daemon

    def start(self) -> None:
        pass

    def recover(self) -> None:
        pass

    def step(self) -> bool:
        return self.daemon.run_one() is not None

    def stop(self) -> None:
        pass


class CeleryDispatcher:
    """Head of a render farm: sends tasks to Celery workers through Redis and files what they report."""

    kind = "celery"
    renders_here = False

    def __init__(self, daemon):
        from heygem_watch import farm

        self.daemon, self.ledger, self.log = daemon, daemon.ledger, daemon.log
        self.farm = farm
        self.app = farm.configure(daemon.settings)
        self._next_send = 0.0
        self._broker_logged = -1e9
        self._backend_logged = -1e9
        self._backend_failed = -1e9  # monotonic time of the last failed poll
        self._orphans: dict[int, float] = {}  # task id -> since when its worker looks dead
        self._rescued: set[int] = set()  # sent again in this poll: their old state is not read back
        self._seen: dict[int, tuple] = {}  # task id -> (worker, delivery) last logged
        self._progress_logged: dict[int, float] = {}
        self._heartbeat_written: dict[str, float] = {}
        self._stopping = threading.Event()
        self._receiver = None
        self._listener: threading.Thread | None = None
        self.dispatch_s: list[float] = []  # per task sent: seconds the head spent (bench/farm.py reads it)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._listener = threading.Thread(target=self._listen, name="farm-events", daemon=True)
        self._listener.start()

    def recover(self) -> None:
        """Start-up: tasks already sent are re-attached (polled), never sent anew; unconfirmed sends repeat."""
        flying = self.ledger.in_flight()
        if flying:
            self.log.info("farm_reattached", tasks=len(flying), celery_ids=[t.celery_id for t in flying][:20],
                          unconfirmed=sum(t.dispatched_at is None for t in flying))

    def stop(self) -> None:
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.should_stop = True

    def step(self) -> bool:
        did = self._send()
        return self._poll() or did

    # -- send -------------------------------------------------------------------------------------------------
    def _broker_down(self, exc: BaseException) -> None:
        self._next_send = time.monotonic() + BROKER_RETRY_S
        now = time.monotonic()
        if now - self._broker_logged >= BROKER_LOG_EVERY_S:
            self._broker_logged = now
            from heygem_watch.config import redact_url

            self.log.error("broker_unavailable", broker=redact_url(self.daemon.settings.broker_url),
                           error=f"{type(exc).__name__}: {exc}",
                           fix="start Redis / check HEYGEM_BROKER_URL; recordings are still taken in and their "
                               "tasks are sent as soon as the broker answers")

    def _send(self) -> bool:
        if time.monotonic() < self._next_send or self.daemon.check_disk():
            return False
        sent = 0
        for t in self.ledger.in_flight(sent=False):  # a send a crash (or the broker) cut short
            if not self._publish(t, t.celery_id):
                return sent > 0
            sent += 1
        for t in self.ledger.undispatched(SEND_BATCH):
            rec = self.ledger.recording(t.recording_id)
            with self.daemon.task_log(rec, t):
                if not self._audio_ready(rec, t):
                    continue
                cid = str(uuid.uuid4())
                t0 = time.perf_counter()
                self.ledger.assign_celery_id(t.id, cid)
                if not self._publish(t, cid, t0):
                    return sent > 0
            sent += 1
        if sent:
            self.daemon.wake.set()
        return sent > 0

    def _audio_ready(self, rec, task) -> bool:
        """The recording's audio, extracted once on the head into the shared var/ (workers read it there)."""
        from heygem_watch import pipeline
        from heygem_watch.media import MediaError

        work = self.daemon.settings.tmp_dir / f"rec-{rec.id}"
        try:
            t0 = time.monotonic()
            job = pipeline.RecordingJob.prepare(rec.source_path, work)
            if time.monotonic() - t0 > 0.05:  # a real extraction, not the reuse of an earlier one
                self.log.info("audio_ready", duration_s=round(job.track.duration, 3),
                              seconds=round(time.monotonic() - t0, 2), notes=job.notes)
            return True
        except MediaError as exc:
            self.log.error("recording_unusable", reason=exc.reason, error=str(exc))
            self.ledger.fail_queued_for(rec.id, f"recording unusable: {exc.reason}")
        except Exception as exc:  # disk full writing the audio: this task fails, not the rest
            self.ledger.fail_task(task.id, f"could not prepare the audio: {exc}", {"error_type": type(exc).__name__})
            self.log.exception("audio_failed", error=str(exc))
        self.daemon.finalise_if_complete(rec.id)
        return False

    def _publish(self, task, celery_id: str, t0: float | None = None) -> bool:
        t0 = time.perf_counter() if t0 is None else t0
        rec = self.ledger.recording(task.recording_id)
        s = self.daemon.settings
        spec = {"task": task.id, "recording": rec.id, "audio_dir": str(s.tmp_dir / f"rec-{rec.id}"),
                "template": task.template_path, "output": str(self.daemon._output_path(rec, task)),
                "tmp_dir": str(s.tmp_dir), "encoder": {"preset": s.encoder.preset, "crf": s.encoder.crf,
                                                             "params": s.encoder.params,
                                                             "max_side": s.encoder.max_side}}
        try:
            self.app.send_task(self.farm.TASK_NAME, args=[spec], task_id=celery_id, queue=self.farm.QUEUE,
                               retry=False)
        except Exception as exc:  # kombu OperationalError, redis ConnectionError...: the id stays, sent later
            self._broker_down(exc)
            return False
        self.ledger.mark_dispatched(task.id)
        took = time.perf_counter() - t0
        self.dispatch_s.append(took)
        self.log.info("task_dispatched", task_id=task.id, celery_id=celery_id, output=spec["output"],
                      dispatch_ms=round(took * 1000, 2))
        return True

    # -- poll -------------------------------------------------------------------------------------------------
    def _metas(self, celery_ids: list[str]) -> list[dict | None] | None:
        backend = self.app.backend
        try:
            raw = backend.mget([backend.get_key_for_task(c) for c in celery_ids]) if celery_ids else []
        except Exception as exc:
            now = self._backend_failed = time.monotonic()
            if now - self._backend_logged >= BROKER_LOG_EVERY_S:
                self._backend_logged = now
                self.log.error("result_backend_unavailable", error=f"{type(exc).__name__}: {exc}",
                               fix="start Redis; running tasks are picked up again when it answers")
            return None
        return [backend.decode_result(v) if v is not None else None for v in raw]

    def _poll(self) -> bool:
        flying = self.ledger.in_flight(sent=True)
        metas = self._metas([t.celery_id for t in flying])
        if metas is None:
            return False
        changed = self._rescue_orphans(flying, metas)
        for t, meta in zip(flying, metas):
            if not meta or t.id in self._rescued:
                continue  # PENDING: waiting in the broker
            state, result = meta.get("status"), meta.get("result")
            if state == "PROGRESS" and isinstance(result, dict):
                self._progress(t, result)
            elif state in ("PROGRESS", "SUCCESS", "FAILURE"):
                with self._task_log(t):
                    changed |= self._apply(t, state, result)
        return changed

    def _task_log(self, t):
        return self.daemon.task_log(self.ledger.recording(t.recording_id), t)

    def _progress(self, t, result: dict) -> None:
        """A running task's report, read every poll: the ledger is written only when it changed, and the
        recording is looked up and its log opened only when there is something to log."""
        who = (result.get("worker"), int(result.get("delivery") or 1))
        done, total = int(result.get("done") or 0), int(result.get("total") or 0)
        fps, eta = float(result.get("fps") or 0.0), result.get("eta_s")
        now = time.monotonic()
        started = self._seen.get(t.id) != who
        log_due = bool(total and done and now - self._progress_logged.get(t.id, -1e9) >= PROGRESS_LOG_S)
        with self._task_log(t) if started or log_due else nullcontext():
            if started:
                self._seen[t.id] = who
                self.log.info("task_start", worker=who[0], attempt=who[1], celery_id=t.celery_id)
            if (t.state, t.worker, t.attempts, t.progress_done) != ("running", who[0], who[1], done):
                self.ledger.mark_remote_progress(t.id, who[0], who[1], done, total, fps, eta)
            if log_due:
                self._progress_logged[t.id] = now
                self.log.info("progress", worker=who[0], done=done, total=total, fps=round(fps, 1), eta_s=eta)

    def _apply(self, t, state: str, result) -> bool:
        """A farm task's outcome (SUCCESS or FAILURE; a PROGRESS without a report counts as failed, as before)."""
        self._seen.pop(t.id, None)
        self._progress_logged.pop(t.id, None)
        self.ledger.set_delivery(t.id, None, self._deliveries(t.celery_id))
        if state == "SUCCESS":
            res = result if isinstance(result, dict) else {}
            out = Path(res.get("output") or "")
            if not res.get("output") or not out.is_file():
                self.ledger.fail_task(t.id, f"worker {res.get('worker')} reported {out} written, but it is not "
                                            "there: is var/ shared at the same path on every host?")
                self.log.error("task_failed", error="output missing", worker=res.get("worker"))
            else:
                timings = dict(res.get("timings") or {})
                timings.update(worker=res.get("worker") or t.worker, celery_id=t.celery_id,
                               engine=res.get("engine"), delivery=res.get("delivery") or t.attempts)
                if not res.get("already_done") and res.get("worker"):
                    self.ledger.set_delivery(t.id, res["worker"], res.get("delivery") or 1)
                self.ledger.finish_task(t.id, out, timings)
                self.log.info("task_done", output=str(out), worker=timings["worker"],
                              frames=timings.get("frames"), seconds=timings.get("wall_s"))
        else:
            reason = str(result) if result is not None else "failed on the worker"
            self.ledger.fail_task(t.id, reason, {"celery_id": t.celery_id, "worker": t.worker,
                                                 "error_type": type(result).__name__})
            self.log.error("task_failed", error=reason, worker=t.worker, celery_id=t.celery_id)
        self.daemon.finalise_if_complete(t.recording_id)
        return True

    def _rescue_orphans(self, flying, metas) -> bool:
        """A task running on a worker that went silent (no Celery heartbeat for ledger.WORKER_LOST_S, or it said
        goodbye) and whose lease lapsed has no live render: the worker died. Its message would come back only after
        the visibility timeout (hours); the same task id is sent again now instead and a free worker takes it. The
        old message, when Redis gives it back, finds the output and does nothing."""
        self._rescued = set()
        now = time.monotonic()
        if now - self._backend_failed < 3 * ORPHAN_GRACE_S:  # leases and heartbeats catch up after an outage
            self._orphans.clear()
            return False
        states = None  # the workers' states, read only when some task is running on a worker
        for t, meta in zip(flying, metas):
            status = (meta or {}).get("status")
            if t.state == "running" and t.worker and status not in ("SUCCESS", "FAILURE") and states is None:
                states = {w["hostname"]: w["state"] for w in self.ledger.workers_status()}
            if t.state != "running" or not t.worker or status in ("SUCCESS", "FAILURE") or \
                    states.get(t.worker, "lost") == "online":
                self._orphans.pop(t.id, None)
                continue
            try:
                if self.farm.redis_client().exists(self.farm.lease_key(t.celery_id)):
                    self._orphans.pop(t.id, None)
                    continue
            except Exception:
                return False
            since = self._orphans.setdefault(t.id, now)
            if now - since < ORPHAN_GRACE_S:
                continue
            self._orphans.pop(t.id, None)
            with self._task_log(t):
                try:
                    self.app.AsyncResult(t.celery_id).forget()  # its last PROGRESS names the dead worker
                except Exception:
                    return False
                self.ledger.requeue_remote(t.id)
                self.log.warning("worker_lost", worker=t.worker, celery_id=t.celery_id, attempt=t.attempts,
                                 action="sent again; a free worker renders it")
                self._seen.pop(t.id, None)
                self._rescued.add(t.id)
                self._publish(t, t.celery_id)
        return bool(self._rescued)

    def _deliveries(self, celery_id: str) -> int:
        """How many deliveries of the task a worker started rendering (farm.render counts them in Redis)."""
        try:
            return int(self.farm.redis_client().get(self.farm.deliveries_key(celery_id)) or 0)
        except Exception:
            return 0

    # -- worker heartbeats ------------------------------------------------------------------------------------
    def _on_worker_event(self, event: dict) -> None:
        host, kind = event.get("hostname"), event.get("type", "")
        if not host:
            return
        now = time.monotonic()
        offline = kind == "worker-offline"
        if not offline and kind == "worker-heartbeat" and now - self._heartbeat_written.get(host, -1e9) \
                < HEARTBEAT_WRITE_S:
            return
        self._heartbeat_written[host] = now
        try:
            self.ledger.worker_seen(host, state="offline" if offline else "online", active=event.get("active"),
                                    processed=event.get("processed"), at=float(event.get("timestamp") or time.time()))
        except Exception as exc:  # a ledger hiccup must not end the listener
            self.log.warning("worker_heartbeat_not_recorded", worker=host, error=str(exc))
        if kind in ("worker-online", "worker-offline"):
            self.log.info(kind.replace("-", "_"), worker=host)

    def _listen(self) -> None:
        handlers = {k: self._on_worker_event for k in ("worker-heartbeat", "worker-online", "worker-offline")}
        while not self._stopping.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    self._receiver = self.app.events.Receiver(conn, handlers=handlers)
                    self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception:  # broker down: the send/poll path logs it; listen again when it is back
                pass
            self._stopping.wait(BROKER_RETRY_S)
