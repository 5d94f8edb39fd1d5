"""Logging: structlog JSON lines on stdout (journald keeps them), a readable console format on a TTY, and a
per-recording JSONL file under var/logs/YYYY-MM-DD/<recording-stem>.jsonl.

Context (recording_id, template, task_id) travels in structlog contextvars, so every event logged while a task
runs carries it without being passed around: `with log_context(recording_id=3, task_id=7): ...`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import structlog

LOGGER_NAME = "heygem"
CONTEXT_KEYS = ("recording_id", "template", "task_id")  # bound while working on a recording/task

_sinks: dict[int, tuple[object, int]] = {}  # recording_id -> (open file, nesting count)
_sinks_lock = threading.Lock()
_configured = False


def _to_sinks(logger, method: str, event: dict) -> dict:
    """Copy events about a recording into its JSONL file (if one is open in this process)."""
    rid = event.get("recording_id")
    if rid is None or not _sinks:
        return event
    with _sinks_lock:
        entry = _sinks.get(rid)
        if entry is not None:
            f = entry[0]
            try:
                f.write(json.dumps(event, default=str, ensure_ascii=False) + "\n")
                f.flush()
            except (OSError, ValueError):  # a full disk must not stop the render; stdout still has it
                pass
    return event


def _utc(logger, method: str, event: dict) -> dict:
    now = time.time()
    event.setdefault("ts", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z")
    return event


def configure(fmt: str = "json", level: str = "info", stream=None) -> None:
    """Set structlog up once per process (calling again reconfigures: SIGHUP, tests)."""
    global _configured
    stream = stream or sys.stdout
    renderer = (structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())
                if fmt == "console" else structlog.processors.JSONRenderer(default=str, ensure_ascii=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _utc,
            structlog.processors.format_exc_info,
            _to_sinks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging (uvicorn, apscheduler, watchdog, warnings.warn): their warnings become
    # events of ours, so a JSON log stays JSON; uncaught exceptions too, with their traceback inside the event.
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(h)
    root.addHandler(_ToStructlog())
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = lambda a: _uncaught(a.exc_type, a.exc_value, a.exc_traceback,
                                               thread=getattr(a.thread, "name", None))
    for noisy in ("apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # inotify's emitter reports events that arrive while the observer stops as an error: harmless, confusing
    logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
    _configured = True


class _ToStructlog(logging.Handler):
    """stdlib logging -> one `library_log` event (message, logger, exception when there is one)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            kw = {"message": record.getMessage(), "logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            log = structlog.get_logger(LOGGER_NAME)
            getattr(log, level if level in ("debug", "info", "warning", "error", "critical") else "warning")(
                "library_log", **kw)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _uncaught(exc_type, exc, tb, thread: str | None = None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    structlog.get_logger(LOGGER_NAME).critical("uncaught_exception", error=str(exc), error_type=exc_type.__name__,
                                               thread=thread, exc_info=(exc_type, exc, tb))


def get_logger(**bind):
    if not _configured:
        configure("console" if sys.stdout.isatty() else "json")
    return structlog.get_logger(LOGGER_NAME).bind(**bind) if bind else structlog.get_logger(LOGGER_NAME)


@contextmanager
def log_context(**values) -> Iterator[None]:
    """Bind context (recording_id, template, task_id...) for everything logged in this block, this thread."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def recording_log_path(logs_dir: os.PathLike | str, day: str, stem: str) -> Path:
    return Path(logs_dir) / day / f"{stem}.jsonl"


@contextmanager
def recording_log(logs_dir: os.PathLike | str, day: str, stem: str, recording_id: int) -> Iterator[Path]:
    """Also append every event carrying this recording_id to logs_dir/day/stem.jsonl while the block runs."""
    path = recording_log_path(logs_dir, day, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _sinks_lock:
        entry = _sinks.get(recording_id)
        if entry is None:
            _sinks[recording_id] = (open(path, "a", encoding="utf-8"), 1)
        else:
            _sinks[recording_id] = (entry[0], entry[1] + 1)
    try:
        yield path
    finally:
        with _sinks_lock:
            f, n = _sinks[recording_id]
            if n <= 1:
                del _sinks[recording_id]
                f.close()
            else:
                _sinks[recording_id] = (f, n - 1)
