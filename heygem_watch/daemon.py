"""The daemon: ingest settled recordings into the ledger, run queued tasks one at a time, file the results.

Threads: main (signals, SIGHUP reload, shutdown), worker (claims the oldest queued task from the ledger, so
dashboard uploads run too), the watcher's settle thread (fingerprints and ingests), apscheduler (rescan,
retention, disk guard, systemd watchdog). The engine is created once; its models stay loaded between tasks.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path

from heygem_watch import __version__
from heygem_watch.config import Settings, load_settings
from heygem_watch.housekeeping import (apply_retention, list_templates, sd_notify, unique_path,  # noqa: F401
                                       watchdog_interval, write_json_atomic)
from heygem_watch.ledger import Ledger, Recording, Task, fingerprint_file
from heygem_watch.logs import get_logger, log_context, recording_log
from heygem_watch.watch import IncomingWatcher

SHUTDOWN_GRACE_S = 7.0  # SIGTERM -> exit well within systemd's (and the issue's) 10 s
IDLE_POLL_S = 1.0  # the worker looks at the ledger this often when idle (the web process adds tasks too)
PROGRESS_LOG_S = 4.0  # progress events at least every 5 s (the pipeline reports every 2 s)
DISK_LOG_EVERY_S = 60.0
RETENTION_EVERY_S = 3600
DATED = "%Y-%m-%d"


class Daemon:
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
        self._job = None  # (recording_id, pipeline.RecordingJob) shared by that recording's templates
        self._job_notes: list[str] = []
        self._tpl_fp: dict[tuple[str, int, int], str] = {}
        self.current: Task | None = None
        self.watcher = self._make_watcher()
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
            self._tpl_fp[key] = fingerprint_file(p)
        return self._tpl_fp[key]

    def output_dir_for(self, day: str, stem: str) -> Path:
        base = self.settings.outputs_dir / day / stem
        d, i = base, 1
        while d.exists() or self.ledger.output_dir_in_use(d):
            i += 1
            d = base.with_name(f"{stem}-{i}")
        return d

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
                size = path.stat().st_size
                fp = fingerprint_file(path)
            except FileNotFoundError:
                self.log.warning("vanished", path=str(path), reason="removed before it could be read")
                return None
            except OSError as exc:
                self._fail_unreadable(path, day, f"cannot read the file ({exc.strerror or exc})", exc)
                return None
            pairs = []
            for t in templates:
                try:
                    pairs.append((str(t), self._template_fingerprint(t)))
                except OSError as exc:
                    self.log.error("template_unreadable", template=t.name, error=exc.strerror or str(exc),
                                   fix=f"make {t} readable by the service user")
            if not pairs:
                self.watcher.forget(path)
                return None
            res = self.ledger.add_recording(path, fp, size, pairs, source=source, batch=batch,
                                            output_dir=self.output_dir_for(day, path.stem), day=day)
        if res.duplicate_of is not None:
            self._handle_duplicate(path, res.duplicate_of, day)
        else:
            with log_context(recording_id=res.recording_id), \
                    recording_log(s.logs_dir, day, path.stem, res.recording_id):
                self.log.info("recording_queued", path=str(path), size=size, fingerprint=fp,
                              templates=[Path(t).name for t, _ in pairs], tasks=res.task_ids)
            self.wake.set()
        return res

    def _handle_duplicate(self, path: Path, first_id: int, day: str) -> None:
        """Same content as an earlier recording: not processed again; the file goes where ON_DONE says."""
        first = self.ledger.recording(first_id)
        same_file = os.path.realpath(path) == os.path.realpath(first.source_path)
        if same_file and (first.state in ("queued", "running") or self.settings.on_done == "keep"):
            # the very file already queued (a dashboard upload into incoming/) or kept after processing
            self.log.info("already_known", path=str(path), recording_id=first_id, state=first.state)
            return
        dest = self._dispose(path, day)
        self.log.warning("duplicate", path=str(path), duplicate_of=first_id, first_name=first.name,
                         first_state=first.state, on_done=self.settings.on_done,
                         moved_to=str(dest) if dest else None)

    def _dispose(self, path: Path, day: str) -> Path | None:
        """ON_DONE for a finished (or duplicate) source: archive/DATE/, delete, or keep. Never raises."""
        try:
            return self._dispose_or_raise(path, day)
        except OSError as exc:
            self.log.error("source_not_moved", path=str(path), on_done=self.settings.on_done,
                           error=exc.strerror or str(exc), fix="give the service user write access to the folder")
            return path if path.exists() else None

    def _dispose_or_raise(self, path: Path, day: str) -> Path | None:
        if not path.exists():
            return None
        if self.settings.on_done == "delete":
            path.unlink()
            return None
        if self.settings.on_done == "keep":
            return path
        dest = unique_path(self.settings.archive_dir / day / path.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), dest)
        return dest

    def _to_failed(self, path: Path, day: str, info: dict) -> Path | None:
        """Move an unusable source to failed/DATE/ with <name>.error.json beside it (even in keep/delete mode:
        a recording we could not process is never thrown away and never retried in a loop)."""
        dest_dir = self.settings.failed_dir / day
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = unique_path(dest_dir / path.name)
        moved = None
        if path.exists():
            try:
                shutil.move(str(path), dest)
                moved = dest
            except OSError as exc:
                info["move_error"] = f"could not move the file: {exc.strerror or exc}"
        write_json_atomic(dest.with_name(dest.name + ".error.json"), info)
        return moved

    def _fail_unreadable(self, path: Path, day: str, reason: str, exc: BaseException) -> None:
        info = {"recording": path.name, "source_path": str(path), "reason": reason,
                "exception": "".join(traceback.format_exception_only(type(exc), exc)).strip(),
                "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        dest = self._to_failed(path, day, info)
        self.log.error("recording_unreadable", path=str(path), reason=reason, moved_to=str(dest) if dest else None)

    # -- tasks ------------------------------------------------------------------------------------------------
    def ensure_engine(self):
        if self.engine is None:
            from heygem_watch import engines

            t0 = time.monotonic()
            self.engine = engines.create_engine(self.settings.engine, self.settings.model,
                                                 onnx_options=self.settings.onnx_options)
            self.log.info("engine_ready", **self.engine.describe(), seconds=round(time.monotonic() - t0, 2))
        return self.engine

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
        task = self.ledger.claim_next_task()
        if task is None:
            return None
        rec = self.ledger.recording(task.recording_id)
        self.current = task
        try:
            with log_context(recording_id=rec.id, task_id=task.id, template=task.template_name), \
                    recording_log(self.settings.logs_dir, rec.day, Path(rec.name).stem, rec.id):
                self._run_task(rec, task)
                if not any(t.state in ("queued", "running") for t in self.ledger.tasks_for(rec.id)):
                    self.finalise(rec.id)
        finally:
            self.current = None
        return task

    def _run_task(self, rec: Recording, task: Task) -> None:
        from heygem_watch import pipeline
        from heygem_watch.media import MediaError

        self.log.info("task_start", attempt=task.attempts, queued=self.ledger.counts()["queued"])
        try:
            job, audio_s = self._job_for(rec)
        except MediaError as exc:
            reason = exc.reason
            self.log.error("recording_unusable", reason=reason, error=str(exc))
            self.ledger.fail_task(task.id, f"recording unusable: {reason}", {"error_type": type(exc).__name__})
            self.ledger.fail_queued_for(rec.id, f"recording unusable: {reason}")
            return
        except Exception as exc:  # e.g. disk full while writing the decoded audio: this task fails, not the rest
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
            self.ledger.fail_task(task.id, str(exc), {"audio_decode_s": round(audio_s, 3),
                                                      "error_type": type(exc).__name__})
            self.log.error("task_failed", error=str(exc), error_type=type(exc).__name__)
            return
        timings = res.as_dict()
        timings.update(audio_decode_s=round(audio_s, 3), audio_duration_s=job.track.duration)
        timings["notes"] = list(dict.fromkeys(list(res.notes) + self._job_notes))
        self.ledger.finish_task(task.id, out, timings)
        self.log.info("task_done", output=str(out), frames=res.frames, seconds=round(res.wall_s, 2),
                      fps=round(res.fps, 1), notes=timings["notes"])

    # -- filing -----------------------------------------------------------------------------------------------
    def finalise(self, recording_id: int) -> str:
        """All tasks of a recording are finished: manifest.json, move the source, set the recording's state."""
        rec = self.ledger.recording(recording_id)
        tasks = self.ledger.tasks_for(rec.id)
        n_done = sum(t.state == "done" for t in tasks)
        state = "done" if tasks and n_done == len(tasks) else ("partial" if n_done else "failed")
        src = Path(rec.source_path)
        if self._job is not None and self._job[0] == rec.id:
            self._drop_job()
        shutil.rmtree(self.settings.tmp_dir / f"rec-{rec.id}", ignore_errors=True)
        errors = sorted({t.error for t in tasks if t.error})
        finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest = {
            "heygem_watch": __version__,
            "recording": {"id": rec.id, "name": rec.name, "source_path": rec.source_path, "size": rec.size,
                          "fingerprint": rec.fingerprint, "source": rec.source, "batch": rec.batch,
                          "audio_duration_s": next((t.timings.get("audio_duration_s") for t in tasks
                                                    if t.timings.get("audio_duration_s") is not None), None)},
            "engine": self.engine.describe() if self.engine is not None else {"engine": self.settings.engine},
            "state": state,
            "notes": list(dict.fromkeys(n for t in tasks for n in t.timings.get("notes", []))),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(rec.created_at)),
            "finished_at": finished,
            "templates": [{"template": t.template_name, "template_path": t.template_path,
                           "fingerprint": t.template_fingerprint, "status": t.state, "error": t.error,
                           "output": Path(t.output_path).name if t.output_path else None, "attempts": t.attempts,
                           "timings": t.timings} for t in tasks],
        }
        out_dir = Path(rec.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "manifest.json", manifest)
        if state == "failed":
            reason = "; ".join(errors) or "no template produced an output"
            if len(tasks) > 1 and not all(e.startswith("recording unusable") for e in errors):
                reason = "every template failed: " + reason
            info = {"recording": rec.name, "source_path": rec.source_path, "fingerprint": rec.fingerprint,
                    "reason": reason,
                    "exception": [{"template": t.template_name, "type": t.timings.get("error_type"),
                                   "message": t.error} for t in tasks if t.error],
                    "tasks": manifest["templates"], "created_at": manifest["created_at"],
                    "failed_at": finished}
            final = self._to_failed(src, rec.day, info)
            self.ledger.set_recording_state(rec.id, "failed", error=info["reason"], final_path=final)
            self.log.error("recording_failed", reason=info["reason"], moved_to=str(final) if final else None,
                           manifest=str(out_dir / "manifest.json"))
        else:
            final = self._dispose(src, rec.day) if src.exists() else None
            self.ledger.set_recording_state(rec.id, state, error="; ".join(errors) or None, final_path=final)
            self.log.info("recording_done", state=state, outputs=n_done, failed=len(tasks) - n_done,
                          output_dir=str(out_dir), source_now=str(final) if final else None)
        return state

    # -- housekeeping -----------------------------------------------------------------------------------------
    def check_disk(self) -> bool:
        """True (and an error at most once a minute) while free space in var/ is below HEYGEM_MIN_FREE_MB."""
        try:
            free_mb = shutil.disk_usage(self.settings.var_dir).free / 2**20
        except OSError:
            return False
        low = free_mb < self.settings.min_free_mb
        now = time.monotonic()
        if low and now - self._disk_logged >= DISK_LOG_EVERY_S:
            self._disk_logged = now
            self.log.error("disk_low", free_mb=round(free_mb), min_free_mb=self.settings.min_free_mb,
                           path=str(self.settings.var_dir), fix="free space; queued tasks wait until then")
        if self._disk_low and not low:
            self.log.info("disk_ok", free_mb=round(free_mb))
        self._disk_low = low
        return low

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
        n = self.ledger.requeue_running()
        if n:
            self.log.warning("requeued_after_crash", tasks=n)
        for p in self.settings.tmp_dir.rglob(".partial-*"):
            p.unlink(missing_ok=True)
        for rec in self.ledger.unfinished_recordings():
            with log_context(recording_id=rec.id):
                self.finalise(rec.id)

    def reload(self) -> None:
        """SIGHUP: re-read config (templates are re-listed at every ingest anyway)."""
        try:
            new = load_settings(self.config_path)
        except Exception as exc:
            self.log.error("reload_failed", error=str(exc), kept="previous settings")
            return
        engine_changed = (new.engine, new.model) != (self.settings.engine, self.settings.model)
        self.settings = new
        self._tpl_fp.clear()
        w = self.watcher
        w.extensions, w.settle_seconds = tuple(new.extensions), new.settle_seconds
        if engine_changed and self._own_engine and self.engine is not None:
            old, self.engine = self.engine, None  # the worker creates the new one before its next task
            old.close()
        self.log.info("reloaded", settings=new.as_dict(), engine_changed=engine_changed)
        self.watcher.scan()

    def _worker_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                task = self.run_one()
            except Exception as exc:  # a ledger/disk hiccup must not kill the worker
                self.log.exception("worker_error", error=str(exc))
                task = None
                self.stopping.wait(5)
            if task is None:
                self.wake.wait(IDLE_POLL_S)
                self.wake.clear()

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        s = self.scheduler = BackgroundScheduler(daemon=True)
        s.add_job(self.watcher.scan, "interval", seconds=self.settings.rescan_seconds, id="rescan", coalesce=True)
        s.add_job(self.retention, "interval", seconds=RETENTION_EVERY_S, id="retention", coalesce=True)
        s.add_job(self.check_disk, "interval", seconds=DISK_LOG_EVERY_S, id="disk", coalesce=True)
        wd = watchdog_interval()
        if wd:
            s.add_job(self._watchdog_ping, "interval", seconds=wd, id="watchdog", coalesce=True)
        s.start()

    def _watchdog_ping(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            sd_notify("WATCHDOG=1")

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.log.info("starting", version=__version__, pid=os.getpid(), settings=self.settings.as_dict())
        self.recover()
        self.retention()
        self.check_disk()
        if not list_templates(self.settings.template_dir):
            self.log.warning("no_templates", template_dir=str(self.settings.template_dir),
                             fix="put avatar videos or images there; recordings wait until then")
        self.ensure_engine()
        self.watcher.start()
        self._start_scheduler()
        self._worker = threading.Thread(target=self._worker_loop, name="worker", daemon=True)
        self._worker.start()
        sd_notify(f"READY=1\nSTATUS=watching {self.settings.incoming_dir}\nMAINPID={os.getpid()}")
        self.log.info("ready", incoming=str(self.settings.incoming_dir), templates=len(list_templates(
            self.settings.template_dir)), engine=self.engine.describe() if self.engine else None)

    def request_stop(self, *_args) -> None:
        self.stopping.set()
        self.cancel.set()
        self.wake.set()

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        self.log.info("stopping", running_task=self.current.id if self.current else None)
        self.request_stop()
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
        self.log.info("stopped", seconds=round(time.monotonic() - t0, 2))

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
