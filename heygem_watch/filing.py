"""Filing: where a recording's source, outputs and manifest go once its tasks are finished, and what becomes of
copies and unusable files. A mixin of daemon.Daemon (it uses the daemon's settings, ledger, log and job).

    finalise(recording)       manifest.json; source -> archive/DATE (or kept/deleted) | failed/DATE + error.json;
                              copies that waited on it follow it
    _handle_duplicate(path)   known content: queued again, waiting beside its original, or disposed of
"""
from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path

from heygem_watch import __version__
from heygem_watch.housekeeping import unique_path, write_json_atomic
from heygem_watch.ledger import Recording


class Filing:
    """Daemon methods that move files and write manifests (self: a daemon.Daemon)."""

    def output_dir_for(self, day: str, stem: str) -> Path:
        base = self.settings.outputs_dir / day / stem
        d, i = base, 1
        while d.exists() or self.ledger.output_dir_in_use(d):
            i += 1
            d = base.with_name(f"{stem}-{i}")
        return d

    def _handle_duplicate(self, path: Path, res, day: str) -> None:
        """Same content as an earlier recording. Its failed tasks and templates it never had were queued again
        (res.task_ids): a finished recording then renders from this file. Otherwise nothing is rendered twice: a
        copy of a recording still being processed waits in incoming/ and is filed like it (failed/ or archive/)
        once it is finished; a copy of a finished one goes where ON_DONE says."""
        first = self.ledger.recording(res.duplicate_of)
        names = [t.template_name for t in self.ledger.tasks_for(first.id) if t.id in set(res.task_ids)]
        waiting = res.prev_state in ("queued", "running")
        if waiting:
            self.ledger.add_follower(first.id, path)
        if res.task_ids:
            self.log.info("recording_requeued", path=str(path), recording_id=first.id, first_name=first.name,
                          queued=names, existing=res.existing,
                          source=str(path) if not waiting else first.source_path)
            self.wake.set()
            return
        if waiting:
            self.log.info("duplicate_waiting", path=str(path), duplicate_of=first.id, first_name=first.name,
                          first_state=first.state, existing=res.existing,
                          reason="same content as a recording still being processed; filed like it afterwards")
            return
        dest = self._dispose(path, day)
        self.log.warning("duplicate", path=str(path), duplicate_of=first.id, first_name=first.name,
                         first_state=first.state, existing=res.existing, on_done=self.settings.on_done,
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

    def _fail_unreadable(self, path: Path, day: str, reason: str, exc: BaseException | None = None) -> None:
        info = {"recording": path.name, "source_path": str(path), "reason": reason,
                "exception": "".join(traceback.format_exception_only(type(exc), exc)).strip() if exc else None,
                "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        dest = self._to_failed(path, day, info)
        self.log.error("recording_unreadable", path=str(path), reason=reason, moved_to=str(dest) if dest else None)

    def finalise_if_complete(self, recording_id: int) -> None:
        """File the recording once none of its tasks is queued or running any more."""
        if not any(t.state in ("queued", "running") for t in self.ledger.tasks_for(recording_id)):
            self.finalise(recording_id)

    def finalise(self, recording_id: int) -> str:
        """All tasks of a recording are finished: manifest.json, move the source, set the recording's state."""
        rec = self.ledger.recording(recording_id)
        tasks = self.ledger.tasks_for(rec.id)
        # a recording is done when every usable template is: a template found unusable does not make it partial
        checks = self.ledger.template_checks()
        counted = [t for t in tasks if not (t.state == "failed" and t.template_fingerprint in checks
                                            and not checks[t.template_fingerprint]["usable"])]
        n_done = sum(t.state == "done" for t in counted)
        state = "done" if counted and n_done == len(counted) else ("partial" if n_done else "failed")
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
                           "crashes": t.crashes, "stops": t.stops, "timings": t.timings} for t in tasks],
            "unusable_templates": [{"template": c["name"], "reason": c["reason"]}
                                   for c in checks.values()
                                   if not c["usable"] and Path(c["path"]).exists()],
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
            if self._filed_in(src) == "failed":  # a retry that failed again: it stays where it is
                write_json_atomic(src.with_name(src.name + ".error.json"), info)
                final = src
            else:
                final = self._to_failed(src, rec.day, info)
            self.ledger.set_recording_state(rec.id, "failed", error=info["reason"], final_path=final)
            self.log.error("recording_failed", reason=info["reason"], moved_to=str(final) if final else None,
                           manifest=str(out_dir / "manifest.json"))
        else:
            where = self._filed_in(src)
            if where == "archive":  # rendered again from the archive (retry, rerun): it stays there
                final = src
            else:
                final = self._dispose(src, rec.day) if src.exists() else None
                if where == "failed":
                    src.with_name(src.name + ".error.json").unlink(missing_ok=True)
            self.ledger.set_recording_state(rec.id, state, error="; ".join(errors) or None, final_path=final)
            self.log.info("recording_done", state=state, outputs=n_done, failed=len(tasks) - n_done,
                          output_dir=str(out_dir), source_now=str(final) if final else None)
        self._file_followers(rec, state, errors)
        return state

    def _filed_in(self, path: Path) -> str | None:
        """'archive' or 'failed' when path already lies in one of those folders, else None."""
        for name, d in (("archive", self.settings.archive_dir), ("failed", self.settings.failed_dir)):
            try:
                Path(os.path.realpath(path)).relative_to(os.path.realpath(d))
                return name
            except ValueError:
                continue
        return None

    def _file_followers(self, rec: Recording, state: str, errors: list[str]) -> None:
        """Copies dropped while this recording was being processed share its fate."""
        for f in self.ledger.followers(rec.id):
            p = Path(f)
            if not p.exists() or os.path.realpath(p) == os.path.realpath(rec.source_path):
                continue
            if state == "failed":
                reason = f"same content as {rec.name} (recording {rec.id}), which failed: " + \
                         ("; ".join(errors) or "no template produced an output")
                dest = self._to_failed(p, rec.day, {"recording": p.name, "source_path": str(p),
                                                    "fingerprint": rec.fingerprint, "reason": reason,
                                                    "same_as": rec.id,
                                                    "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                self.log.error("recording_failed", path=str(p), reason=reason, moved_to=str(dest) if dest else None)
            else:
                dest = self._dispose(p, rec.day)
                self.log.warning("duplicate", path=str(p), duplicate_of=rec.id, first_name=rec.name,
                                 first_state=state, on_done=self.settings.on_done, moved_to=str(dest) if dest else None)
