"""Small pieces the daemon (and the CLI) use around the pipeline: systemd notification, the template folder
listing, collision-free names, atomic JSON writes, and retention of dated folders."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sqlite3
from datetime import date, timedelta
from pathlib import Path

from heygem_watch.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from heygem_watch.watch import ignored_name

TEMPLATE_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS  # every such file in the template folder is a template
LOCK_NAME = "heygem-watch.lock"  # in var/: held (flock) by the one daemon working there
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class VarLocked(RuntimeError):
    """Another daemon holds var/'s lock."""


def lock_var(var_dir: Path):
    """Take var/'s exclusive lock (flock, released by the kernel when the process dies, so a kill -9 leaves no
    stale lock) and write our pid into it. Returns the open file: keep it, close() releases. Raises VarLocked."""
    path = Path(var_dir) / LOCK_NAME
    f = open(path, "a+")  # not "w": truncating would erase the holder's pid before we know we may
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise VarLocked(f"another heygem-watch (pid {pid}) is using {var_dir} (lock {path}); only one daemon may "
                        "work on a var/ folder: stop the other one (systemctl stop heygem-watch) or set another "
                        "HEYGEM_VAR_DIR") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def disk_full(exc: BaseException | None) -> bool:
    """True when exc (or what caused it) says the disk or the ledger's file system is full."""
    seen = 0
    while exc is not None and seen < 10:
        if getattr(exc, "errno", None) in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and ("disk is full" in str(exc) or
                                               getattr(exc, "sqlite_errorcode", None) == 13):  # SQLITE_FULL
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def sd_notify(message: str) -> bool:
    """Send a state line to systemd ($NOTIFY_SOCKET, a unix datagram socket); False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # never block: a listener that stopped reading must not freeze a shutdown (full datagram queue)
            s.setblocking(False)
            s.connect(addr)
            s.send(message.encode())
        return True
    except OSError:  # BlockingIOError included
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (from $WATCHDOG_USEC), or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2e6)
    except ValueError:
        return None


def list_templates(template_dir: Path) -> list[Path]:
    """Every video or image directly in the template folder, by name."""
    try:
        return sorted(p for p in template_dir.iterdir()
                      if p.is_file() and not ignored_name(p.name) and p.suffix.lower() in TEMPLATE_EXTENSIONS)
    except OSError:
        return []


def unused_in_template_dir(template_dir: Path) -> list[str]:
    """Names of the visible files in the template folder that list_templates leaves out (their type)."""
    try:
        return sorted(p.name for p in template_dir.iterdir()
                      if p.is_file() and not ignored_name(p.name) and p.suffix.lower() not in TEMPLATE_EXTENSIONS)
    except OSError:
        return []


def unique_path(path: Path) -> Path:
    """path, or path with -2, -3... before the suffix when something is already there."""
    if not os.path.lexists(path):
        return path
    for i in range(2, 100000):
        cand = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not os.path.lexists(cand):
            return cand
    raise FileExistsError(path)


def apply_retention(var_dir: Path, days: int, today: date | None = None) -> list[Path]:
    """Delete dated folders (YYYY-MM-DD) older than `days` in outputs, archive, failed and logs. 0 keeps all."""
    if days <= 0:
        return []
    cutoff = (today or date.today()) - timedelta(days=days)
    removed = []
    for sub in ("outputs", "archive", "failed", "logs"):
        base = var_dir / sub
        if not base.is_dir():
            continue
        for d in base.iterdir():
            try:
                day = date.fromisoformat(d.name)
            except ValueError:
                continue
            if d.is_dir() and not d.is_symlink() and day < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
