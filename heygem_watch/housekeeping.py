"""Small pieces the daemon (and the CLI) use around the pipeline: systemd notification, the template folder
listing, collision-free names, atomic JSON writes, and retention of dated folders."""
from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import date, timedelta
from pathlib import Path

from heygem_watch.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from heygem_watch.watch import ignored_name

TEMPLATE_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS  # every such file in the template folder is a template


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
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
