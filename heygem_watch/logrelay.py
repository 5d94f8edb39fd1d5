"""What native libraries write to stderr, as log lines.

MediaPipe, TensorFlow Lite and absl write to file descriptor 2 from C++ whenever a face tracker starts
(`INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`, `W0000 00:00:… inference_feedback_manager.cc:114] …`).
No environment variable silences them (GLOG_minloglevel, TF_CPP_MIN_LOG_LEVEL and ABSL_MIN_LOG_LEVEL were tried
with MediaPipe 0.10.21: absl ignores them), and they break `journalctl … | jq`.

- `start()` (long-running commands): fd 2 becomes a pipe read by a small relay *process* (`python -m
  heygem_watch.logrelay`) that writes each line as a JSON event (or, on a terminal, passes it through) to the
  original stream. A process rather than a thread: when a native library aborts the process, its last words
  (absl `F…` lines) are written by a dying process, and only a reader outside it still gets them out.
- `quiet()` (short commands with a table on stdout, `check`): fd 2 goes to a temporary file for a block; the
  caller gets the lines back and decides what to show.

Known start-up chatter is logged at debug level; any other line keeps its own level (absl/TFLite prefix), or
`warning` when it has none: text nobody expected on stderr deserves a look.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

EVENT = "native_log"
STOP_WAIT_S = 1.0  # stop(): how long the relay may take to write what is left (shutdown must stay under 10 s)
LEVELS = ("debug", "info", "warning", "error", "critical")
# Printed every time a tracker starts; harmless for how MediaPipe is used here (see face.py).
CHATTER = ("Created TensorFlow Lite XNNPACK delegate", "All log messages before absl::InitializeLog()",
           "inference_feedback_manager.cc", "landmark_projection_calculator.cc", "gl_context.cc")
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+:\d+)\] ?(.*)$")  # I0612 20:00:01.123 77 file.cc:12] msg
_PLAIN = re.compile(r"^(INFO|WARNING|ERROR|FATAL): ?(.*)$")  # TFLite's minimal logging
_ABSL_LEVEL = {"I": "info", "W": "warning", "E": "error", "F": "critical"}
_PLAIN_LEVEL = {"INFO": "info", "WARNING": "warning", "ERROR": "error", "FATAL": "critical"}

_relay: subprocess.Popen | None = None
_saved_fd: int | None = None


def classify(line: str) -> dict:
    """One stderr line -> {level, message, source?}; known chatter -> debug."""
    m = _ABSL.match(line)
    if m:
        out = {"level": _ABSL_LEVEL[m.group(1)], "message": m.group(3), "source": m.group(2)}
    else:
        m = _PLAIN.match(line)
        out = ({"level": _PLAIN_LEVEL[m.group(1)], "message": m.group(2)} if m
               else {"level": "warning", "message": line})
    if any(c in line for c in CHATTER):
        out["level"] = "debug"
    return out


def _ts() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def render(line: str, fmt: str, min_level: str, pid: int | None = None) -> str | None:
    """The line as the relay writes it (with its newline), or None when it is below min_level or blank."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if line.startswith("{"):
        try:
            if isinstance(json.loads(line), dict):
                return line + "\n"  # already a log event (a child process logging JSON to stderr)
        except ValueError:
            pass
    ev = classify(line)
    if LEVELS.index(ev["level"]) < LEVELS.index(min_level if min_level in LEVELS else "info"):
        return None
    if fmt != "json":
        return line + "\n"
    ev = {"ts": _ts(), "level": ev.pop("level"), "event": EVENT, **ev, "stream": "stderr"}
    if pid is not None:
        ev["pid"] = pid
    return json.dumps(ev, ensure_ascii=False) + "\n"


def _relay_main(argv: list[str]) -> int:
    """The relay process: stdin (the pipe) -> stdout (the original stream), line by line, until EOF."""
    fmt, level, pid = argv[0], argv[1], int(argv[2])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when the last writer closes the pipe, not before
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        text = render(raw.decode("utf-8", "replace"), fmt, level, pid)
        if text is not None:
            try:
                out.write(text.encode("utf-8"))
                out.flush()
            except OSError:  # the reader of our stdout is gone: drain the pipe so writers never block
                continue
    return 0


def start(fmt: str = "json", level: str = "info", target_fd: int = 2) -> bool:
    """Point fd 2 at the relay, which writes to what target_fd is now. False (nothing changed) if it could not
    start; calling it again while it runs does nothing."""
    global _relay, _saved_fd
    if _relay is not None:
        return True
    sys.stderr.flush()
    target = os.dup(target_fd)
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "heygem_watch.logrelay", fmt, level, str(os.getpid())],
                                stdin=r, stdout=target, close_fds=True, start_new_session=True)
    except OSError:
        os.close(w)
        return False
    finally:
        os.close(r)
        os.close(target)
    _saved_fd = os.dup(2)
    os.dup2(w, 2)
    os.close(w)
    _relay = proc
    return True


def stop() -> None:
    """Give fd 2 back and let the relay write what is left (at most STOP_WAIT_S)."""
    global _relay, _saved_fd
    if _relay is None:
        return
    sys.stderr.flush()
    os.dup2(_saved_fd, 2)  # closes our last write end of the pipe: the relay sees EOF
    os.close(_saved_fd)
    proc, _relay, _saved_fd = _relay, None, None
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:  # a child process of ours still holds the pipe: leave the relay to it
        pass


@contextmanager
def quiet() -> Iterator[list[str]]:
    """fd 2 into a temporary file for the block; the list yielded is filled with its lines afterwards."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


if __name__ == "__main__":
    raise SystemExit(_relay_main(sys.argv[1:]))
