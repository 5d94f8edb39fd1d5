"""The daemon: ingest settled recordings into the ledger, run queued tasks one at a time, file the results.

Threads: main (signals, SIGHUP reload, shutdown), worker (claims the oldest queued task from the ledger, so
dashboard uploads run too), the watcher's settle thread (fingerprints and ingests), apscheduler (rescan,
retention, disk guard, systemd watchdog). The engine is created once; its models stay loaded between tasks.
Where files go once a recording is finished is filing.py; the free-space / disk-full pause is diskguard.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

from heygem_watch import __version__, dispatch
from heygem_watch.config import Settings, load_settings
from heygem_watch.diskguard import DISK_FULL_RESUME_MB, DISK_LOG_EVERY_S, DiskGuard
from heygem_watch.filing import Filing
from heygem_watch.housekeeping import (VarLocked, apply_retention, disk_full, list_templates,  # noqa: F401
                                       lock_var, sd_notify, watchdog_interval)
from heygem_watch.ledger import HEARTBEAT_EVERY_S, Ledger, Recording, Task, fingerprint_file
from heygem_watch.logs import get_logger, log_context, recording_log
from heygem_watch.watch import IncomingWatcher

SHUTDOWN_GRACE_S = 7.0  # SIGTERM -> exit well within systemd's (and the issue's) 10 s
IDLE_POLL_S = 1.0  # the worker looks at the ledger this often when idle (the web process adds tasks too)
FARM_POLL_S = 0.25  # farm head: how often it asks the result backend about in-flight tasks
PROGRESS_LOG_S = 4.0  # progress events at least every 5 s (the pipeline reports every 2 s)
RETENTION_EVERY_S = 3600
DATED = "%Y-%m-%d"
# Settings field -> its key, for SIGHUP. Keys in RESTART_KEYS keep their old value until a restart, with the reason.
RELOAD_KEYS = {"var_dir": "HEYGEM_VAR_DIR", "incoming_dir": "HEYGEM_INCOMING_DIR",
               "template_dir": "HEYGEM_TEMPLATE_DIR", "model_dir": "HEYGEM_MODEL_DIR", "model": "HEYGEM_MODEL",
               "engine": "HEYGEM_ENGINE", "extensions": "HEYGEM_EXTENSIONS", "settle_seconds": "HEYGEM_SETTLE_SECONDS",
               "polling": "HEYGEM_POLLING", "rescan_seconds": "HEYGEM_RESCAN_SECONDS", "on_done": "HEYGEM_ON_DONE",
               "retention_days": "HEYGEM_RETENTION_DAYS", "min_free_mb": "HEYGEM_MIN_FREE_MB",
               "log_format": "HEYGEM_LOG_FORMAT", "log_level": "HEYGEM_LOG_LEVEL",
               "encoder": "HEYGEM_X264_PRESET/HEYGEM_X264_CRF/HEYGEM_ENCODER_THREADS",
               "onnx_options": "HEYGEM_ONNX_PROVIDER/HEYGEM_ONNX_BATCH/HEYGEM_ONNX_THREADS",
               "web_host": "HEYGEM_WEB_HOST", "web_port": "HEYGEM_WEB_PORT", "web_token": "HEYGEM_WEB_TOKEN",
               "web_max_upload_mb": "HEYGEM_WEB_MAX_UPLOAD_MB", "process_cache_dir": "HEYGEM_CACHE_DIR",
               "dispatch": "HEYGEM_DISPATCH", "broker_url": "HEYGEM_BROKER_URL",
               "visibility_timeout": "HEYGEM_VISIBILITY_TIMEOUT"}
_WEB = "read by the dashboard process at its start: systemctl restart heygem-watch-web"
_START = "read once at start: systemctl restart heygem-watch"
RESTART_KEYS = {"var_dir": "the ledger, lock and folders are opened at start: systemctl restart heygem-watch",
                "web_host": _WEB, "web_port": _WEB, "web_token": _WEB, "web_max_upload_mb": _WEB,
                "dispatch": _START, "broker_url": _START, "visibility_timeout": _START}


class Daemon(Filing, DiskGuard):
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

    # -- ingest -----------------------------------------------------------------------------------------------
    def _template_fingerprint(self, p: Path) -> str:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in self._tpl_fp:
            self._tpl_fp[key] = self._fingerprint(p, st)
        return self._tpl_fp[key]

    def _fingerprint(self, p: Path, st: os.stat_result | None = None) -> str:
        """The content fingerprint, remembered in the ledger while size, mtime and inode stay the same (a start
        with hundreds of queued GB-sized files must not hash them all again)."""
        st = st or p.stat()
        fp = self.ledger.known_fingerprint(p, st)
        if fp is None:
            fp = fingerprint_file(p)
            try:
                self.ledger.remember_fingerprint(p, st, fp)
            except Exception as exc:  # only a shortcut: a full disk must not stop the ingest here
                if not disk_full(exc):
                    raise
        return fp

    def check_templates(self, templates: list[Path] | None = None) -> dict[str, dict]:
        """Analyse every template not checked yet (the same cached analysis a render uses); one without a usable
        face is marked unusable with the reason and skipped by the fan-out. Returns fingerprint -> check."""
        from heygem_watch.media import MediaError
        from heygem_watch.template import load_template

        with self._checks_lock:
            checks = self.ledger.template_checks()
            for t in list_templates(self.settings.template_dir) if templates is None else templates:
                try:
                    fp = self._template_fingerprint(t)
                except OSError:
                    continue  # reported by ingest (template_unreadable)
                if fp in checks:
                    continue
                try:
                    load_template(t, self.settings.cache_dir, log=self.log)
                    usable, reason = True, None
                except MediaError as exc:
                    usable, reason = False, exc.reason
                except Exception as exc:  # noqa: BLE001 - not the template's fault (disk, memory): check again later
                    self.log.error("template_check_failed", template=t.name, error=str(exc))
                    continue
                self.ledger.set_template_check(fp, t, usable, reason)
                if usable:
                    self.log.info("template_checked", template=t.name, usable=True)
                else:
                    self.log.error("template_unusable", template=t.name, reason=reason,
                                   fix=f"replace {t} with a clip where the face is frontal, lit and large enough; "
                                       "recordings skip it until then")
                checks = self.ledger.template_checks()
            return checks

    def ingest(self, path: Path, source: str = "watch", batch: str | None = None):
        """A settled recording: fingerprint it and queue one task per template. Returns the AddResult or None."""
        s = self.settings
        day = time.strftime(DATED)
        with log_context(recording=path.name):
            templates = list_templates(s.template_dir)
            if not templates:
                self.log.error("no_templates", path=str(path), template_dir=str(s.template_dir),
                               fix=f"put at least one avatar video or image into {s.template_dir}; "
                                   "the recording stays in incoming and is taken on the next rescan")
                self.watcher.forget(path)
                return None
            try:
                st = path.stat()
                size = st.st_size
                if size == 0:  # never a duplicate of another empty file: each gets its own error.json
                    self._fail_unreadable(path, day, "file is empty (0 bytes)")
                    return None
                fp = self._fingerprint(path, st)
            except FileNotFoundError:
                self.log.warning("vanished", path=str(path), reason="removed before it could be read")
                return None
            except OSError as exc:
                self._fail_unreadable(path, day, f"cannot read the file ({exc.strerror or exc})", exc)
                return None
            prior = self.ledger.find_by_fingerprint(fp)
            here = os.path.realpath(path)
            if prior is not None and prior.state != "failed" and (
                    (prior.state in ("queued", "running") and here == os.path.realpath(prior.source_path))
                    or (prior.final_path and here == os.path.realpath(prior.final_path))):
                # the very file already known: kept after processing (ON_DONE=keep; a restart scans it again),
                # or a dashboard upload into incoming/ that is queued
                self.log.info("already_known", path=str(path), recording_id=prior.id, state=prior.state)
                return None
            try:
                checks = self.check_templates(templates)
            except Exception as exc:
                if not disk_full(exc):
                    raise
                self._enter_disk_full(exc, "checking templates")
                self.watcher.forget(path)
                return None
            pairs, unusable = [], []
            for t in templates:
                try:
                    tfp = self._template_fingerprint(t)
                except OSError as exc:
                    self.log.error("template_unreadable", template=t.name, error=exc.strerror or str(exc),
                                   fix=f"make {t} readable by the service user")
                    continue
                if tfp in checks and not checks[tfp]["usable"]:
                    unusable.append(t.name)
                else:
                    pairs.append((str(t), tfp))
            if not pairs:
                if unusable:
                    self.log.error("no_usable_templates", path=str(path), unusable=unusable,
                                   fix="put a template with a visible face into the template folder; the recording "
                                       "stays in incoming and is taken on the next rescan")
                self.watcher.forget(path)
                return None
            try:
                res = self.ledger.add_recording(path, fp, size, pairs, source=source, batch=batch,
                                                output_dir=self.output_dir_for(day, path.stem), day=day)
            except Exception as exc:
                if not disk_full(exc):
                    raise
                self._enter_disk_full(exc, "recording a new file in the ledger")
                self.watcher.forget(path)  # taken again on a rescan once there is space
                return None
        if res.duplicate_of is not None:
            self._handle_duplicate(path, res, day)
        else:
            with log_context(recording_id=res.recording_id), \
                    recording_log(s.logs_dir, day, path.stem, res.recording_id):
                self.log.info("recording_queued", path=str(path), size=size, fingerprint=fp,
                              templates=[Path(t).name for t, _ in pairs], tasks=res.task_ids,
                              **({"skipped_unusable": unusable} if unusable else {}))
            self.wake.set()
        return res

    # -- tasks ------------------------------------------------------------------------------------------------
    def ensure_engine(self):
        if self.engine is None:
            from heygem_watch import engines

            t0 = time.monotonic()
            self.engine = engines.create_engine(self.settings.engine, self.settings.model,
                                                 onnx_options=self.settings.onnx_options,
                                                 speech_model=self.settings.speech_model)
            self.log.info("engine_ready", **self.engine.describe(), seconds=round(time.monotonic() - t0, 2))
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
            with log_context(recording_id=rec.id, task_id=task.id, template=task.template_name), \
                    recording_log(self.settings.logs_dir, rec.day, Path(rec.name).stem, rec.id):
                try:
                    self._run_task(rec, task)
                    if not any(t.state in ("queued", "running") for t in self.ledger.tasks_for(rec.id)):
                        self.finalise(rec.id)
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
        from heygem_watch import template

        for d in apply_retention(self.settings.var_dir, self.settings.retention_days):
            self.log.info("retention_removed", path=str(d))
        keep = self.ledger.pending_template_fingerprints()
        for t in list_templates(self.settings.template_dir):
            try:
                keep.add(self._template_fingerprint(t))
            except OSError:
                pass
        for d, size in template.prune_cache(self.settings.cache_dir, keep):
            self.log.info("template_cache_pruned", path=str(d), freed_mb=round(size / 2**20, 1))

    def recover(self) -> None:
        """Start-up: re-queue tasks a crash left running, file recordings whose tasks all finished, drop partials."""
        from heygem_watch import template

        n = self.ledger.requeue_running()
        if n:
            self.log.warning("requeued_after_crash", tasks=n)
        farm_tmp = self.settings.tmp_dir / "farm"  # farm workers' partials: each worker cleans its own
        for p in self.settings.tmp_dir.rglob(".partial-*"):
            if farm_tmp not in p.parents:
                p.unlink(missing_ok=True)
        for d, size in template.remove_stale_work(self.settings.cache_dir):
            self.log.info("template_cache_leftover_removed", path=str(d), freed_mb=round(size / 2**20, 1))
        self.ledger.forget_fingerprints(os.path.exists)
        self.dispatcher.recover()
        for rec in self.ledger.unfinished_recordings():
            with log_context(recording_id=rec.id):
                self.finalise(rec.id)

    def reload(self) -> None:
        """SIGHUP: re-read config. Every changed key takes effect now, except those in RESTART_KEYS: they keep
        their old value and the `reloaded` event names them (restart_needed)."""
        import dataclasses

        from heygem_watch.logs import configure

        try:
            new = load_settings(self.config_path)
        except Exception as exc:
            self.log.error("reload_failed", error=str(exc), kept="previous settings")
            return
        old = self.settings
        changed = [f.name for f in dataclasses.fields(old) if f.name != "config_file"
                   and getattr(new, f.name) != getattr(old, f.name)]
        # a setting this method does not know (added later) is not silently "applied": it needs a restart
        later = [f for f in changed if f not in RELOAD_KEYS]
        restart = {RELOAD_KEYS.get(f, f"HEYGEM_{f.upper()}"): RESTART_KEYS.get(f, _START) for f in changed
                   if f in RESTART_KEYS or f in later}
        new = dataclasses.replace(new, **{f: getattr(old, f) for f in changed if f in RESTART_KEYS or f in later})
        engine_changed = (new.engine, new.model, new.onnx_options) != (old.engine, old.model, old.onnx_options)
        self.settings = new
        self._tpl_fp.clear()
        for d in (new.incoming_dir, new.template_dir):
            d.mkdir(parents=True, exist_ok=True)
        if {"log_format", "log_level"} & set(changed):
            configure(new.log_format, new.log_level)
        if {"incoming_dir", "polling"} & set(changed):  # a new folder (or observer kind): a new watcher
            running = self.watcher._observer is not None
            self.watcher.stop()
            self.watcher = self._make_watcher()
            if running:
                self.watcher.start()
        w = self.watcher
        w.extensions, w.settle_seconds = tuple(new.extensions), new.settle_seconds
        if "rescan_seconds" in changed and self.scheduler is not None:
            self.scheduler.reschedule_job("rescan", trigger="interval", seconds=new.rescan_seconds)
        if engine_changed and self._own_engine and self.engine is not None:
            eng, self.engine = self.engine, None  # the worker creates the new one before its next task
            eng.close()
        self.log.info("reloaded", settings=new.as_dict(), engine_changed=engine_changed,
                      applied=[RELOAD_KEYS[f] for f in changed if f in RELOAD_KEYS and f not in RESTART_KEYS],
                      restart_needed=restart)
        if restart:
            self.log.warning("reload_needs_restart", keys=restart, kept="their previous values")
        self.watcher.scan()

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
