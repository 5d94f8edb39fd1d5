"""The daemon: ingest settled recordings into the ledger, run queued tasks one at a time, file the results.

Threads: main (signals, SIGHUP reload, shutdown), worker (claims the oldest queued task from the ledger, so
dashboard uploads run too), the watcher's settle thread (fingerprints and ingests), apscheduler (rescan,
retention, disk guard, systemd watchdog). The engine is created once; its models stay loaded between tasks.
From a settled file to queued tasks is ingest.py; where files go once a recording is finished, filing.py; the
free-space / disk-full pause, diskguard.py; SIGHUP, reload.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from heygem_watch import __version__, dispatch
from heygem_watch.config import Settings
from heygem_watch.diskguard import DISK_FULL_RESUME_MB, DISK_LOG_EVERY_S, DiskGuard
from heygem_watch.filing import Filing
from heygem_watch.housekeeping import (VarLocked, apply_retention, disk_full, list_templates,  # noqa: F401
                                       lock_var, sd_notify, watchdog_interval)
from heygem_watch.ingest import Ingest
from heygem_watch.ledger import HEARTBEAT_EVERY_S, Ledger, Recording, Task
from heygem_watch.logs import get_logger, log_context, recording_log
from heygem_watch.reload import Reload
from heygem_watch.watch import IncomingWatcher

SHUTDOWN_GRACE_S = 7.0  # SIGTERM -> exit well within systemd's (and the issue's) 10 s
IDLE_POLL_S = 1.0  # the worker looks at the ledger this often when idle (the web process adds tasks too)
FARM_POLL_S = 0.25  # farm head: how often it asks the result backend about in-flight tasks
PROGRESS_LOG_S = 4.0  # progress events at least every 5 s (the pipeline reports every 2 s)
RETENTION_EVERY_S = 3600


class Daemon(Ingest, Reload, Filing, DiskGuard):
    """One per process. `run()` blocks until SIGTERM/SIGINT; tests drive ingest()/run_one()/finalise directly."""

    def __init__(self, settings: Settings, *, engine=None, config_path: str | None = None, clock=time.monotonic):
        self.settings, self.config_path, self.clock = settings, config_path, clock
        self.log = get_logger()
        for d in (settings.var_dir, settings.incoming_dir, settings.template_dir, settings.outputs_dir,
                  settings.archive_dir, settings.failed_dir, settings.logs_dir, settings.cache_dir, settings.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(settings.ledger_path)
        self.engine = engine
        self._own_engine = engine is None
        self.stopping = threading.Event()
        self.cancel = threading.Event()  # cancels the running render
        self.wake = threading.Event()  # something was queued
        self._reload = threading.Event()
        self._disk_low = False
        self._disk_logged = -1e9
        self._full_at: float | None = None  # free MB when a write failed for lack of space; None when not paused
        self._full_why = ""
        self._full_margin = float(DISK_FULL_RESUME_MB)
        self._resume_pending = False  # the worker re-files what the pause left unfinished
        self._stranded: set[int] = set()  # tasks that could not be put back in the ledger while it was full
        self._var_lock = None
        self._checks_lock = threading.Lock()
        self._job = None  # (recording_id, pipeline.RecordingJob) shared by that recording's templates
        self._job_notes: list[str] = []
        self._tpl_fp: dict[tuple[str, int, int], str] = {}
        self._tpl_unused_said: set[str] = set()  # template-folder files of a type not read, logged once each
        self.current: Task | None = None
        self.watcher = self._make_watcher()
        self.dispatcher = dispatch.create(self)  # renders here, or sends to the farm (HEYGEM_DISPATCH)
        self.scheduler = None
        self._worker: threading.Thread | None = None

    def _make_watcher(self) -> IncomingWatcher:
        s = self.settings
        return IncomingWatcher(s.incoming_dir, s.extensions, s.settle_seconds, self.ingest, polling=s.polling,
                               on_refused=lambda p, why: self.log.error("refused", path=str(p), reason=why),
                               clock=self.clock)

    # -- tasks ------------------------------------------------------------------------------------------------
    def ensure_engine(self):
        if self.engine is None:  # an unusable one: recordings still queue; each task fails naming the fix
            from heygem_watch import engines

            self.engine = engines.start_engine(self.settings, self.log)
        return self.engine

    def _unusable(self, task: Task) -> str | None:
        """The reason when the task's template is known to be unusable. Checking it here also waits for a check
        of the same template already running (start-up, rescan): it is analysed once, not twice at once."""
        checks = self.ledger.template_checks()
        p = Path(task.template_path)
        if task.template_fingerprint not in checks and p.is_file():  # not checked yet, or being checked right now
            checks = self.check_templates([p])
        c = checks.get(task.template_fingerprint)
        return c["reason"] or "no usable face" if c is not None and not c["usable"] else None

    def _output_path(self, rec: Recording, task: Task) -> Path:
        stem = Path(task.template_name).stem
        if sum(Path(t.template_name).stem == stem for t in self.ledger.tasks_for(rec.id)) > 1:
            stem = task.template_name.replace(".", "-")  # a.mp4 and a.png side by side
        return Path(rec.output_dir) / f"{stem}.mp4"

    def _job_for(self, rec: Recording):
        from heygem_watch import pipeline

        if self._job is not None and self._job[0] == rec.id:
            return self._job[1], 0.0
        self._drop_job()
        t0 = time.monotonic()
        job = pipeline.RecordingJob.prepare(rec.source_path, self.settings.tmp_dir / f"rec-{rec.id}")
        self._job = (rec.id, job)
        secs = time.monotonic() - t0
        notes = job.notes
        self._job_notes = [n for n in notes if "truncated" in n]
        (self.log.warning if self._job_notes else self.log.info)(
            "audio_ready", duration_s=round(job.track.duration, 3), seconds=round(secs, 2), notes=notes)
        return job, secs

    def _drop_job(self) -> None:
        if self._job is not None:
            self._job[1].cleanup()
            self._job = None

    @contextmanager
    def task_log(self, rec: Recording, task: Task):
        """Events in the block carry the task's ids and also go to the recording's own log file."""
        with log_context(recording_id=rec.id, task_id=task.id, template=task.template_name), \
                recording_log(self.settings.logs_dir, rec.day, Path(rec.name).stem, rec.id):
            yield

    def run_one(self) -> Task | None:
        """Claim and run the oldest queued task (if disk space allows). Returns it, or None when idle."""
        if self.check_disk():
            return None
        try:
            if self._resume_pending:
                self._after_disk_pause()
            task = self.ledger.claim_next_task()
        except Exception as exc:
            if not disk_full(exc):
                raise
            self._enter_disk_full(exc, "updating the ledger")
            return None
        if task is None:
            return None
        rec = self.ledger.recording(task.recording_id)
        self.current = task
        try:
            with self.task_log(rec, task):
                try:
                    self._run_task(rec, task)
                    self.finalise_if_complete(rec.id)
                except Exception as exc:
                    if not disk_full(exc):
                        raise
                    self._put_back(rec, task, exc)
        finally:
            self.current = None
        return task

    def _run_task(self, rec: Recording, task: Task) -> None:
        from heygem_watch import pipeline
        from heygem_watch.media import MediaError

        self.log.info("task_start", attempt=task.attempts, crashes=task.crashes, stops=task.stops,
                      queued=self.ledger.counts()["queued"])
        why = self._unusable(task)
        if why:  # queued before its template was found unusable: skipped, and not held against the recording
            self.ledger.fail_task(task.id, f"template unusable: {why}", {"error_type": "TemplateError"})
            self.log.warning("task_skipped", reason=f"template unusable: {why}")
            return
        try:
            job, audio_s = self._job_for(rec)
        except MediaError as exc:
            reason = exc.reason
            self.log.error("recording_unusable", reason=reason, error=str(exc))
            self.ledger.fail_task(task.id, f"recording unusable: {reason}", {"error_type": type(exc).__name__})
            self.ledger.fail_queued_for(rec.id, f"recording unusable: {reason}")
            return
        except Exception as exc:  # this task fails, not the rest (a full disk pauses instead: run_one)
            shutil.rmtree(self.settings.tmp_dir / f"rec-{rec.id}", ignore_errors=True)
            if disk_full(exc):
                raise
            self.ledger.fail_task(task.id, f"could not prepare the audio: {exc}", {"error_type": type(exc).__name__})
            self.log.exception("audio_failed", error=str(exc))
            return
        last_log = [-1e9]

        def progress(done: int, total: int, fps: float, eta: float) -> None:
            self.ledger.update_progress(task.id, done, total, fps, eta)
            now = time.monotonic()
            if now - last_log[0] >= PROGRESS_LOG_S or done >= total:
                last_log[0] = now
                self.log.info("progress", done=done, total=total, fps=round(fps, 1), eta_s=round(eta, 1))

        out = self._output_path(rec, task)
        self.cancel.clear()
        try:
            engine = self.ensure_engine()
            res = pipeline.run_task(job, task.template_path, engine, out, self.settings.tmp_dir,
                                    self.settings.cache_dir, progress=progress, cancel=self.cancel,
                                    encoder=self.settings.encoder, log=self.log)
        except pipeline.Cancelled:
            self.ledger.requeue_task(task.id)
            self.log.warning("task_cancelled", reason="shutdown", requeued=True)
            return
        except Exception as exc:  # one failing template never stops the others
            if disk_full(exc):
                raise
            self.ledger.fail_task(task.id, str(exc), {"audio_decode_s": round(audio_s, 3),
                                                      "error_type": type(exc).__name__})
            self.log.error("task_failed", error=str(exc), error_type=type(exc).__name__)
            from heygem_watch.template import TemplateError

            if isinstance(exc, TemplateError):  # e.g. no face: later recordings skip it (check_templates)
                self.ledger.set_template_check(task.template_fingerprint, task.template_path, False, exc.reason)
            return
        timings = res.as_dict()
        timings.update(audio_decode_s=round(audio_s, 3), audio_duration_s=job.track.duration)
        timings["notes"] = list(dict.fromkeys(list(res.notes) + self._job_notes))
        self.ledger.finish_task(task.id, out, timings)
        self.log.info("task_done", output=str(out), frames=res.frames, seconds=round(res.wall_s, 2),
                      fps=round(res.fps, 1), notes=timings["notes"])

    # -- housekeeping -----------------------------------------------------------------------------------------
    def retention(self) -> None:
        from heygem_watch import template_cache

        for d in apply_retention(self.settings.var_dir, self.settings.retention_days):
            self.log.info("retention_removed", path=str(d))
        keep = self.ledger.pending_template_fingerprints()
        for t in list_templates(self.settings.template_dir):
            try:
                keep.add(self._template_fingerprint(t))
            except OSError:
                pass
        for d, size in template_cache.prune_cache(self.settings.cache_dir, keep):
            self.log.info("template_cache_pruned", path=str(d), freed_mb=round(size / 2**20, 1))

    def recover(self) -> None:
        """Start-up: re-queue tasks a crash left running, file recordings whose tasks all finished, drop partials."""
        from heygem_watch import template_cache

        n = self.ledger.requeue_running()
        if n:
            self.log.warning("requeued_after_crash", tasks=n)
        farm_tmp = self.settings.tmp_dir / "farm"  # farm workers' partials: each worker cleans its own
        for p in self.settings.tmp_dir.rglob(".partial-*"):
            if farm_tmp not in p.parents:
                p.unlink(missing_ok=True)
        for d, size in template_cache.remove_stale_work(self.settings.cache_dir):
            self.log.info("template_cache_leftover_removed", path=str(d), freed_mb=round(size / 2**20, 1))
        self.ledger.forget_fingerprints(os.path.exists)
        self.dispatcher.recover()
        for rec in self.ledger.unfinished_recordings():
            with log_context(recording_id=rec.id):
                self.finalise(rec.id)

    def _worker_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                task = self.dispatcher.step()
            except Exception as exc:  # a ledger/disk hiccup must not kill the worker
                if disk_full(exc):
                    self._enter_disk_full(exc, "filing results")
                else:
                    self.log.exception("worker_error", error=str(exc))
                task = None
                self.stopping.wait(5)
            if not task:
                self.wake.wait(IDLE_POLL_S if self.dispatcher.renders_here else FARM_POLL_S)
                self.wake.clear()

    def rescan(self) -> None:
        """Periodic job: incoming/ again (missed events) and the template folder (new templates are checked)."""
        self.watcher.scan()
        self.check_templates()

    def _start_scheduler(self) -> None:
        import datetime

        from apscheduler.schedulers.background import BackgroundScheduler

        s = self.scheduler = BackgroundScheduler(daemon=True)
        s.add_job(self.rescan, "interval", seconds=self.settings.rescan_seconds, id="rescan", coalesce=True,
                  next_run_time=datetime.datetime.now())  # templates are checked at start, off the start path
        s.add_job(self.retention, "interval", seconds=RETENTION_EVERY_S, id="retention", coalesce=True)
        s.add_job(self.check_disk, "interval", seconds=DISK_LOG_EVERY_S, id="disk", coalesce=True)
        s.add_job(self.beat, "interval", seconds=HEARTBEAT_EVERY_S, id="heartbeat", coalesce=True)
        wd = watchdog_interval()
        if wd:
            s.add_job(self._watchdog_ping, "interval", seconds=wd, id="watchdog", coalesce=True)
        s.start()

    def beat(self) -> None:
        """Heartbeat in the ledger: `status` and the dashboard say "renderer not running" when it goes stale."""
        if self._worker is not None and not self._worker.is_alive():
            return  # a dead worker renders nothing: let the beat go stale
        try:
            self.ledger.beat()
        except Exception as exc:  # noqa: BLE001 - a locked or full ledger: the next beat tries again
            self.log.warning("heartbeat_failed", error=str(exc))

    def _watchdog_ping(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            sd_notify("WATCHDOG=1")

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Raises VarLocked when another daemon works on this var/ (before touching anything)."""
        self._var_lock = lock_var(self.settings.var_dir)
        self.log.info("starting", version=__version__, pid=os.getpid(), settings=self.settings.as_dict())
        self.recover()
        self.retention()
        self.check_disk()
        if not list_templates(self.settings.template_dir):
            self.log.warning("no_templates", template_dir=str(self.settings.template_dir),
                             fix="put avatar videos or images there; recordings wait until then")
        if self.dispatcher.renders_here:
            self.ensure_engine()
        self.dispatcher.start()
        self.watcher.start()
        self._start_scheduler()
        self._worker = threading.Thread(target=self._worker_loop, name="worker", daemon=True)
        self._worker.start()
        self.beat()
        sd_notify(f"READY=1\nSTATUS=watching {self.settings.incoming_dir}\nMAINPID={os.getpid()}")
        self.log.info("ready", incoming=str(self.settings.incoming_dir), templates=len(list_templates(
            self.settings.template_dir)), engine=self.engine.describe() if self.engine else None,
                      dispatch=self.dispatcher.kind)

    def request_stop(self, *_args) -> None:
        self.stopping.set()
        self.cancel.set()
        self.wake.set()

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self.log.info("stopping", running_task=self.current.id if self.current else None)
        self.request_stop()
        self.dispatcher.stop()
        t0 = time.monotonic()
        self.watcher.stop(timeout=2.0)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self._worker is not None:
            self._worker.join(max(0.5, SHUTDOWN_GRACE_S - (time.monotonic() - t0)))
            if self._worker.is_alive() and self.current is not None:
                # stuck outside the frame loop (e.g. analysing a template): the task goes back to the queue and
                # the process exits anyway; only var/tmp may hold a .partial file, removed at the next start
                self.ledger.requeue_task(self.current.id)
                self.log.warning("task_abandoned", task_id=self.current.id, requeued=True)
        if self._own_engine and self.engine is not None and not (self._worker and self._worker.is_alive()):
            self.engine.close()
        try:
            self.ledger.beat_stopped()
        except Exception as exc:  # noqa: BLE001 - the heartbeat goes stale by itself then
            self.log.warning("heartbeat_failed", error=str(exc))
        self.log.info("stopped", seconds=round(time.monotonic() - t0, 2))
        if self._var_lock is not None:
            self._var_lock.close()
            self._var_lock = None

    def run(self) -> int:
        """Foreground until SIGTERM/SIGINT; SIGHUP reloads."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, lambda *_: (self._reload.set(), self.wake.set()))
        self.start()
        while not self.stopping.wait(0.5):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
        t0 = time.monotonic()
        self.stop()
        # Interpreter exit waits for non-daemon threads (a scheduler job stuck on a slow share, an encoder thread):
        # give them what is left of the grace period, then leave anyway; the ledger is already consistent.
        others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
        for t in others:
            t.join(max(0.0, SHUTDOWN_GRACE_S - (time.monotonic() - t0)))
        if (self._worker is not None and self._worker.is_alive()) or any(t.is_alive() for t in others):
            import sys

            from heygem_watch import logrelay

            sys.stdout.flush()
            logrelay.stop()
            os._exit(0)
        self.ledger.close()
        return 0
