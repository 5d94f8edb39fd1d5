"""Ingest: a settled recording is fingerprinted (remembered in the ledger while the file is unchanged) and one
task per usable template is queued; templates are checked once per content (a face or not). Known content extends
the recording it matches (duplicates: filing.py). A mixin of daemon.Daemon.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from heygem_watch.housekeeping import disk_full, list_templates, unused_in_template_dir
from heygem_watch.ledger import fingerprint_file
from heygem_watch.logs import log_context, recording_log

DATED = "%Y-%m-%d"  # the dated folders recordings are filed under (local date of arrival)


class Ingest:
    """Daemon methods from a settled file to queued tasks (self: a daemon.Daemon; state set up in its __init__)."""

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
            if templates is None:
                for name in unused_in_template_dir(self.settings.template_dir):
                    if name not in self._tpl_unused_said:  # once per name and run: the folder is rescanned
                        self._tpl_unused_said.add(name)
                        self.log.warning("template_file_not_used", file=name,
                                         reason="not a video or image type heygem-watch reads",
                                         fix="an iPhone's HEIC photo: save it as JPEG; a GIF: as MP4")
            for t in list_templates(self.settings.template_dir) if templates is None else templates:
                try:
                    fp = self._template_fingerprint(t)
                except OSError:
                    continue  # reported by ingest (template_unreadable)
                if fp in checks:
                    continue
                try:
                    load_template(t, self.settings.cache_dir, log=self.log, max_side=self.settings.encoder.max_side)
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
