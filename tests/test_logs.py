"""Logging: with JSON logs every line the process writes (stdout and stderr, native libraries included) is JSON."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests import gen_media

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "heygem-watch"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_")}
    env.update(HEYGEM_LOG_FORMAT="json", HEYGEM_MIN_FREE_MB="0", HEYGEM_SETTLE_SECONDS="0",
               HEYGEM_X264_PRESET="ultrafast", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _not_json(lines: list[str]) -> list[str]:
    bad = []
    for line in lines:
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


class _Reader(threading.Thread):
    """Collects one pipe's lines; `wait_for(text)` blocks until a line contains it."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines, self.cond = pipe, [], threading.Condition()

    def run(self):
        for line in self.pipe:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(text in x for x in self.lines), timeout)


def test_daemon_with_a_new_template_writes_only_json_lines(tmp_path):
    """Done-when of issue 11: the real daemon analyses a template it has never seen (MediaPipe/TFLite print to
    fd 2 from native code then) and renders a recording; every stdout and stderr line parses as a JSON object."""
    var = tmp_path / "var"
    (var / "templates").mkdir(parents=True)
    (var / "incoming").mkdir()
    gen_media.face_video(var / "templates" / "anchor.mp4", n=8)
    # debug: the native libraries' start-up chatter (logged at debug) is then in the log, as JSON
    p = subprocess.Popen([str(EXE), "run"], cwd=tmp_path, env=_env(HEYGEM_LOG_LEVEL="debug"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = _Reader(p.stdout), _Reader(p.stderr)
    out.start()
    err.start()
    try:
        assert out.wait_for('"event": "ready"', 90), "\n".join(out.lines + err.lines)
        gen_media.write_av(tmp_path / "talk.flv", 1.0)
        os.replace(tmp_path / "talk.flv", var / "incoming" / "talk.flv")
        assert out.wait_for('"event": "recording_done"', 120), "\n".join(out.lines + err.lines)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    out.join(10)
    err.join(10)
    assert p.returncode == 0
    assert not _not_json(out.lines), "non-JSON on stdout:\n" + "\n".join(_not_json(out.lines))
    assert not _not_json(err.lines), "non-JSON on stderr:\n" + "\n".join(_not_json(err.lines))
    events = [json.loads(x) for x in out.lines + err.lines]
    assert any(e.get("event") == "template_analysed" for e in events)
    native = [e for e in events if e.get("event") == "native_log"]
    assert any("XNNPACK" in e["message"] for e in native), native
    # the README's recipes: every line is an object with ts, level and event
    assert all({"ts", "level", "event"} <= set(e) for e in events), [e for e in events if "event" not in e][:3]
    if shutil.which("jq"):  # the README's own command, on this very log
        log = "\n".join(out.lines + err.lines) + "\n"
        r = subprocess.run(["jq", "-c", 'select(.level=="error")'], input=log, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["jq", "-r", 'select(.event=="progress") | "\\(.done)/\\(.total) \\(.fps) fps"'],
                           input=log, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_check_prints_its_table_clean(tmp_path):
    """`check` on a template never analysed: only its table, nothing from the native libraries on either stream."""
    var = tmp_path / "var"
    (var / "templates").mkdir(parents=True)
    gen_media.face_video(var / "templates" / "anchor.mp4", n=8)
    r = subprocess.run([str(EXE), "check"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert any("template anchor.mp4" in x for x in lines), r.stdout
    table = [x for x in lines if not x.startswith(("ok ", "PROBLEM ", "         fix: "))]
    assert table == [lines[-1]], r.stdout
    assert lines[-1] == "all checks passed" or lines[-1].endswith("problem(s)"), r.stdout


def test_native_lines_are_classified_and_chatter_is_debug():
    from heygem_watch import logrelay

    absl = "W0000 00:00:1796232277.859052    7231 inference_feedback_manager.cc:114] Feedback manager requires a model"
    assert logrelay.classify(absl) == {"level": "debug", "message": "Feedback manager requires a model",
                                       "source": "inference_feedback_manager.cc:114"}
    assert logrelay.classify("E0612 20:00:01.5 77 calculator_graph.cc:887] graph failed")["level"] == "error"
    assert logrelay.classify("ERROR: Didn't find op for builtin opcode")["level"] == "error"
    assert logrelay.classify("something nobody expected")["level"] == "warning"
    assert logrelay.render("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", "json", "info") is None
    ev = json.loads(logrelay.render("F0612 20:00:01.5 77 x.cc:1] Check failed: ok", "json", "info", pid=5))
    assert ev["level"] == "critical" and ev["event"] == "native_log" and ev["source"] == "x.cc:1" and ev["pid"] == 5
    assert logrelay.render('{"event": "x", "level": "info"}', "json", "info") == '{"event": "x", "level": "info"}\n'


RELAY_CRASH = """
import logging, os, sys, warnings
sys.path.insert(0, {root!r})
from heygem_watch import logrelay
from heygem_watch.logs import configure, get_logger
configure("json", "info")
assert logrelay.start("json", "info")
logging.getLogger("somelib").warning("library says %s", "hi")
warnings.warn("deprecated thing")
print("plain text to stderr from Python", file=sys.stderr, flush=True)
os.write(2, b"F0000 00:00:1796232277.1 7 check.cc:9] Check failed: frame != nullptr\\n")
os.abort()
"""


def test_stderr_relay_keeps_a_native_abort_s_last_words_as_json(tmp_path):
    """A native abort kills the process: the relay, a process of its own, still logs what it wrote to fd 2;
    stdlib logging, warnings and plain prints to stderr come out as JSON too."""
    r = subprocess.run([sys.executable, "-c", RELAY_CRASH.format(root=str(ROOT))], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0  # run() returns once the relay, the last holder of the stderr pipe, has exited
    lines = r.stdout.splitlines() + r.stderr.splitlines()
    assert not _not_json(lines), _not_json(lines)
    events = [json.loads(x) for x in lines]
    assert {"level": "critical", "source": "check.cc:9"}.items() <= next(
        e for e in events if "Check failed" in e.get("message", "")).items()
    assert any(e["event"] == "library_log" and e["message"] == "library says hi" and e["logger"] == "somelib"
               for e in events)
    assert any(e["event"] == "library_log" and "deprecated thing" in e["message"] for e in events)
    assert any(e.get("message") == "plain text to stderr from Python" and e["level"] == "warning" for e in events)


def test_a_bad_setting_at_service_start_is_a_json_line(tmp_path):
    """Under systemd the most common start failure, an invalid config.env, is read with jq too."""
    r = subprocess.run([str(EXE), "run"], cwd=tmp_path, env=_env(HEYGEM_ON_DONE="shred"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and not _not_json(lines), r.stderr
    ev = json.loads(lines[0])
    assert ev["event"] == "config_invalid" and ev["level"] == "error" and "HEYGEM_ON_DONE" in ev["error"]
