"""SIGHUP: the daemon re-reads its configuration. Every changed key takes effect at once (a new watcher for a new
incoming folder, a new engine before the next task, logging, rescan interval) except RESTART_KEYS, which keep their
value until a restart and are named in the `reloaded` event. A mixin of daemon.Daemon.
"""
from __future__ import annotations

from heygem_watch.config import ENGINE_FIELDS, load_settings

# Settings field -> its key, for SIGHUP. Keys in RESTART_KEYS keep their old value until a restart, with the reason.
RELOAD_KEYS = {"var_dir": "HEYGEM_VAR_DIR", "incoming_dir": "HEYGEM_INCOMING_DIR",
               "template_dir": "HEYGEM_TEMPLATE_DIR", "model_dir": "HEYGEM_MODEL_DIR", "model": "HEYGEM_MODEL",
               "engine": "HEYGEM_ENGINE", "extensions": "HEYGEM_EXTENSIONS", "settle_seconds": "HEYGEM_SETTLE_SECONDS",
               "polling": "HEYGEM_POLLING", "rescan_seconds": "HEYGEM_RESCAN_SECONDS", "on_done": "HEYGEM_ON_DONE",
               "retention_days": "HEYGEM_RETENTION_DAYS", "min_free_mb": "HEYGEM_MIN_FREE_MB",
               "log_format": "HEYGEM_LOG_FORMAT", "log_level": "HEYGEM_LOG_LEVEL",
               "encoder": "HEYGEM_X264_PRESET/HEYGEM_X264_CRF/HEYGEM_ENCODER_THREADS",
               "onnx_options": "HEYGEM_ONNX_PROVIDER/HEYGEM_ONNX_BATCH/HEYGEM_ONNX_THREADS",
               "speech_model": "HEYGEM_SPEECH_MODEL", "speech_detector": "HEYGEM_SPEECH_DETECTOR",
               "web_host": "HEYGEM_WEB_HOST", "web_port": "HEYGEM_WEB_PORT", "web_token": "HEYGEM_WEB_TOKEN",
               "web_max_upload_mb": "HEYGEM_WEB_MAX_UPLOAD_MB", "process_cache_dir": "HEYGEM_CACHE_DIR",
               "dispatch": "HEYGEM_DISPATCH", "broker_url": "HEYGEM_BROKER_URL",
               "visibility_timeout": "HEYGEM_VISIBILITY_TIMEOUT"}
_WEB = "read by the dashboard process at its start: systemctl restart heygem-watch-web"
_START = "read once at start: systemctl restart heygem-watch"
RESTART_KEYS = {"var_dir": "the ledger, lock and folders are opened at start: systemctl restart heygem-watch",
                "web_host": _WEB, "web_port": _WEB, "web_token": _WEB, "web_max_upload_mb": _WEB,
                "dispatch": _START, "broker_url": _START, "visibility_timeout": _START}


class Reload:
    """The daemon's SIGHUP handling (self: a daemon.Daemon)."""

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
        engine_changed = any(getattr(new, k) != getattr(old, k) for k in ENGINE_FIELDS)
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
