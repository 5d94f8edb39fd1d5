"""daemon.py: ingest -> tasks -> outputs filed by date, manifests, ON_DONE, duplicates, cancel, crash recovery,
disk guard, retention, SIGHUP reload, sd_notify; plus the real process under SIGTERM and kill -9."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from heygem_watch import daemon as daemon_mod
from heygem_watch.engines.base import Engine
from heygem_watch.ledger import Ledger
from heygem_watch.media import probe
from tests import gen_media
from tests.conftest import daemon_script, drain, wait_for

ROOT = Path(__file__).resolve().parents[1]


def today() -> str:
    return time.strftime("%Y-%m-%d")


def drop(d, name, seconds=1.0, **kw) -> Path:
    p = d.settings.incoming_dir / name
    if p.suffix == ".wav":
        gen_media.write_wav(p, gen_media.speech(seconds))
    else:
        gen_media.write_av(p, seconds, **kw)
    return p


def ingest_all(d) -> list[Path]:
    d.watcher.scan()
    return d.watcher.check()


def test_recording_becomes_one_output_per_template_filed_by_date(daemon_factory, face_template_file, tmp_path):
    import shutil

    d = daemon_factory()
    shutil.copy(face_template_file, d.settings.template_dir / "second face.png")
    name = "-直播 录像 \"quoted\" 'x'.flv"
    src = drop(d, name, 1.2)
    assert ingest_all(d) == [src]
    assert drain(d) == 2
    out_dir = d.settings.outputs_dir / today() / Path(name).stem
    outs = sorted(p.name for p in out_dir.glob("*.mp4"))
    assert outs == ["anchor.mp4", "second face.mp4"]
    for o in outs:
        info = probe(out_dir / o)
        assert info.has_video and info.has_audio and (info.width, info.height) == (240, 288)
        assert abs(info.duration - 1.2) < 0.15
    assert not src.exists() and (d.settings.archive_dir / today() / name).exists()
    man = json.loads((out_dir / "manifest.json").read_text())
    assert man["state"] == "done" and man["recording"]["name"] == name
    assert len(man["recording"]["fingerprint"]) == 40 and man["engine"]["engine"] == "passthrough"
    assert [t["status"] for t in man["templates"]] == ["done", "done"]
    assert all(t["fingerprint"] and t["timings"]["frames"] > 0 for t in man["templates"])
    rec = d.ledger.recent_recordings(1)[0]
    assert rec.state == "done" and rec.final_path.endswith(name)
    log = d.settings.logs_dir / today() / f"{Path(name).stem}.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert {x["event"] for x in lines} >= {"recording_queued", "task_start", "progress", "task_done", "recording_done"}
    assert all(x["recording_id"] == rec.id for x in lines)
    assert all("task_id" in x and "template" in x for x in lines if x["event"] in ("task_start", "task_done"))
    progress = [x for x in lines if x["event"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] > 0
    assert list(d.settings.tmp_dir.rglob("*.mp4")) == []  # nothing partial left behind


@pytest.mark.parametrize("on_done", ["keep", "delete"])
def test_on_done_keep_and_delete(daemon_factory, on_done):
    d = daemon_factory(HEYGEM_ON_DONE=on_done)
    src = drop(d, "talk.wav", 0.4)
    ingest_all(d)
    drain(d)
    assert (d.settings.outputs_dir / today() / "talk" / "anchor.mp4").exists()
    assert src.exists() == (on_done == "keep")
    assert not (d.settings.archive_dir / today() / "talk.wav").exists()
    d.watcher.scan()
    assert d.watcher.check() == []  # a kept file is not taken again


def test_duplicate_content_is_not_processed_twice(daemon_factory):
    d = daemon_factory()
    drop(d, "first.wav", 0.4)
    ingest_all(d)
    drain(d)
    archived = d.settings.archive_dir / today() / "first.wav"
    b = d.settings.incoming_dir / "same again.wav"
    b.write_bytes(archived.read_bytes())
    assert ingest_all(d) == [b]
    assert drain(d) == 0
    assert not b.exists() and (d.settings.archive_dir / today() / "same again.wav").exists()  # nothing lost
    assert not (d.settings.outputs_dir / today() / "same again").exists()
    ev = d.ledger.events("duplicate")
    assert len(ev) == 1 and ev[0]["detail"]["path"] == str(b)


def test_same_stem_twice_a_day_gets_its_own_folder(daemon_factory):
    d = daemon_factory()
    drop(d, "show.wav", 0.3)
    ingest_all(d)
    drain(d)
    p = d.settings.incoming_dir / "show.wav"
    gen_media.write_wav(p, gen_media.tone(0.3))
    ingest_all(d)
    drain(d)
    base = d.settings.outputs_dir / today()
    assert (base / "show" / "anchor.mp4").exists() and (base / "show-2" / "anchor.mp4").exists()
    assert (d.settings.archive_dir / today() / "show-2.wav").exists()


class FailFor(Engine):
    """Passthrough, except that rendering a template named in `names` (all when empty) raises."""

    name = "fail-for"

    def __init__(self, *names):
        self.names = set(names)

    def render(self, template, state, speech, jobs):
        if not self.names or template.path.name in self.names:
            raise RuntimeError(f"the engine broke on {template.path.name}")
        for j in jobs:
            yield j.image


def test_one_failing_template_does_not_stop_the_others(daemon_factory, face_template_file, tmp_path):
    wall = gen_media.face_png(tmp_path / "wall.png", size=(200, 240))
    d = daemon_factory(templates=(face_template_file, wall), engine=FailFor("wall.png"))
    drop(d, "rec.wav", 0.4)
    ingest_all(d)
    drain(d)
    out = d.settings.outputs_dir / today() / "rec"
    assert (out / "anchor.mp4").exists() and not (out / "wall.mp4").exists()
    man = json.loads((out / "manifest.json").read_text())
    st = {t["template"]: t for t in man["templates"]}
    assert st["anchor.png"]["status"] == "done" and st["wall.png"]["status"] == "failed"
    assert "engine broke" in st["wall.png"]["error"]
    assert man["state"] == "partial"
    assert (d.settings.archive_dir / today() / "rec.wav").exists()


def test_every_template_failing_moves_the_recording_to_failed(daemon_factory):
    d = daemon_factory(engine=FailFor())
    src = drop(d, "rec.wav", 0.3)
    ingest_all(d)
    drain(d)
    failed = d.settings.failed_dir / today() / "rec.wav"
    assert failed.exists() and not src.exists()
    err = json.loads((failed.parent / "rec.wav.error.json").read_text())
    assert "engine broke" in err["reason"] and err["failed_at"] and err["created_at"]
    assert err["exception"][0]["type"] == "RuntimeError"
    assert d.ledger.recent_recordings(1)[0].state == "failed"


def test_an_engine_without_its_models_is_named_at_start_and_each_task_says_why(daemon_factory, monkeypatch, capsys):
    """A model the engine cannot load (here the speech detector, as after an update without ./setup.sh) is logged
    as engine_unusable when the daemon starts its engine, not first seen at a recording; tasks then fail naming the
    fix, and the recording is kept in failed/ for a retry."""
    from heygem_watch import engines
    from heygem_watch.engines.base import EngineError

    why = "the silero-vad package (its speech-detection model) is not installed; run ./setup.sh"

    class Unloaded(Engine):
        name = "unloaded"

        def ready(self):
            raise EngineError(why)

        def analyse_speech(self, audio):
            self.ready()

        def render(self, template, state, speech, jobs):
            raise AssertionError("never reached")

    monkeypatch.setattr(engines, "create_engine", lambda *a, **kw: Unloaded())
    d = daemon_factory(engine=None)
    capsys.readouterr()
    d.ensure_engine()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    bad = [e for e in events if e["event"] == "engine_unusable"]
    assert len(bad) == 1 and bad[0]["error"] == why and bad[0]["level"] == "error"
    assert not any(e["event"] == "engine_ready" for e in events)
    src = drop(d, "rec.wav", 0.3)
    ingest_all(d)
    drain(d)
    err = json.loads((d.settings.failed_dir / today() / "rec.wav.error.json").read_text())
    assert why in err["reason"] and not src.exists()


def test_no_templates_leaves_the_recording_waiting(daemon_factory, capsys):
    d = daemon_factory(templates=())
    src = drop(d, "early.wav", 0.3)
    assert ingest_all(d) == [src]
    assert src.exists() and d.ledger.counts()["queued"] == 0
    assert "no_templates" in capsys.readouterr().out

    from tests import gen_media as gm

    gm.face_png(d.settings.template_dir / "late.png")
    assert ingest_all(d) == [src]  # taken again on the next scan once a template exists
    assert drain(d) == 1


class CancelAfter(Engine):
    """Passthrough that raises the daemon's cancel flag after n frames (a SIGTERM mid-render)."""

    name = "cancel-after"

    def __init__(self, n):
        self.n, self.daemon = n, None

    def render(self, template, state, speech, jobs):
        for j in jobs:
            if j.index == self.n and self.daemon is not None:
                self.daemon.cancel.set()
            yield j.image


def test_cancelled_task_goes_back_to_the_queue_without_a_partial_file(daemon_factory):
    eng = CancelAfter(5)
    d = daemon_factory(engine=eng)
    eng.daemon = d
    drop(d, "long.wav", 2.0)
    ingest_all(d)
    t = d.run_one()
    assert d.ledger.task(t.id).state == "queued"
    out = d.settings.outputs_dir / today() / "long"
    assert not list(out.glob("*.mp4")) and not list(d.settings.tmp_dir.rglob(".partial-*"))
    assert (d.settings.incoming_dir / "long.wav").exists()  # not filed: its task is pending
    eng.daemon = None
    assert drain(d) == 1
    assert [p.name for p in out.glob("*.mp4")] == ["anchor.mp4"] and d.ledger.task(t.id).attempts == 2


def test_restart_after_crash_requeues_and_finishes_exactly_once(daemon_factory, passthrough_engine):
    from heygem_watch.daemon import Daemon

    d = daemon_factory()
    drop(d, "crash.wav", 0.4)
    ingest_all(d)
    t = d.ledger.claim_next_task()  # the process "dies" here with the task running
    (d.settings.tmp_dir / ".partial-deadbeef.mp4").write_bytes(b"half a file")
    d.ledger.close()
    d2 = Daemon(d.settings, engine=passthrough_engine)
    d2.recover()
    assert d2.ledger.task(t.id).state == "queued"
    assert not list(d2.settings.tmp_dir.rglob(".partial-*"))
    assert drain(d2) == 1
    assert [p.name for p in (d.settings.outputs_dir / today() / "crash").glob("*.mp4")] == ["anchor.mp4"]
    assert d2.ledger.task(t.id).state == "done"
    d2.ledger.close()


def test_recording_finished_but_not_filed_is_filed_at_start(daemon_factory, passthrough_engine):
    from heygem_watch.daemon import Daemon

    d = daemon_factory()
    src = drop(d, "filed.wav", 0.3)
    ingest_all(d)
    t = d.ledger.claim_next_task()
    d.ledger.finish_task(t.id, "/somewhere.mp4", {})  # crash right after the last task, before filing
    d2 = Daemon(d.settings, engine=passthrough_engine)
    d2.recover()
    assert not src.exists() and (d.settings.archive_dir / today() / "filed.wav").exists()
    assert d2.ledger.recording(t.recording_id).state == "done"
    d2.ledger.close()


def test_disk_guard_holds_tasks_and_logs(daemon_factory, capsys):
    d = daemon_factory(HEYGEM_MIN_FREE_MB=str(10**9))
    drop(d, "wait.wav", 0.3)
    ingest_all(d)
    assert d.run_one() is None and d.run_one() is None
    assert d.ledger.counts()["queued"] == 1
    out = capsys.readouterr().out
    assert out.count('"disk_low"') == 1  # at most once a minute
    d.settings.min_free_mb = 0
    assert drain(d) == 1


def test_retention_deletes_only_old_dated_folders(tmp_path):
    var = tmp_path / "var"
    old = (date(2026, 1, 31) - timedelta(days=31)).isoformat()
    keep = (date(2026, 1, 31) - timedelta(days=29)).isoformat()
    for sub in ("outputs", "archive", "failed", "logs"):
        for day in (old, keep, "not-a-date"):
            (var / sub / day).mkdir(parents=True)
    assert daemon_mod.apply_retention(var, 0, date(2026, 1, 31)) == []
    removed = daemon_mod.apply_retention(var, 30, date(2026, 1, 31))
    assert sorted(p.parent.name for p in removed) == ["archive", "failed", "logs", "outputs"]
    for sub in ("outputs", "archive", "failed", "logs"):
        assert sorted(p.name for p in (var / sub).iterdir()) == sorted([keep, "not-a-date"])


def test_sighup_reload_rereads_config(daemon_factory, tmp_path, env_clean):
    d = daemon_factory()
    cfg = tmp_path / "config.env"
    cfg.write_text(f"HEYGEM_VAR_DIR={d.settings.var_dir}\nHEYGEM_SETTLE_SECONDS=42\nHEYGEM_ON_DONE=keep\n"
                   "HEYGEM_MIN_FREE_MB=0\n")
    d.config_path = str(cfg)
    d.reload()
    assert d.settings.settle_seconds == 42 and d.watcher.settle_seconds == 42 and d.settings.on_done == "keep"
    cfg.write_text("HEYGEM_SETTLE_SECONDS=never\n")
    d.reload()  # a broken edit keeps the previous settings
    assert d.settings.settle_seconds == 42


def test_reload_builds_a_new_engine_for_a_new_speech_setting(daemon_factory, tmp_path, env_clean, capsys):
    """HEYGEM_SPEECH_DETECTOR (karaoke tonight) and HEYGEM_SPEECH_MODEL take effect on SIGHUP: the engine the
    daemon built is closed and the next task builds one from the new settings."""
    import json

    class Built:
        closed = False

        def close(self):
            self.closed = True

    d = daemon_factory(engine=None)
    d.engine = built = Built()
    cfg = tmp_path / "config.env"
    cfg.write_text(f"HEYGEM_VAR_DIR={d.settings.var_dir}\nHEYGEM_MIN_FREE_MB=0\nHEYGEM_SPEECH_DETECTOR=false\n")
    d.config_path = str(cfg)
    capsys.readouterr()
    d.reload()
    assert d.settings.speech_detector is False and d.engine is None and built.closed
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    done = [e for e in events if e["event"] == "reloaded"][-1]
    assert done["engine_changed"] and "HEYGEM_SPEECH_DETECTOR" in done["applied"] and not done["restart_needed"]


def test_sd_notify_writes_to_the_socket(tmp_path, env_clean):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        assert daemon_mod.sd_notify("READY=1") is False  # not under systemd
        env_clean.setenv("NOTIFY_SOCKET", path)
        assert daemon_mod.sd_notify("WATCHDOG=1")
        assert s.recv(100) == b"WATCHDOG=1"
        env_clean.setenv("WATCHDOG_USEC", "30000000")
        assert daemon_mod.watchdog_interval() == 15.0
    finally:
        s.close()


# -- the real process ------------------------------------------------------------------------------------------
def start_daemon(tmp_path, var, delay, notify_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_")}
    env.update(HEYGEM_VAR_DIR=str(var), HEYGEM_SETTLE_SECONDS="0.3", HEYGEM_MIN_FREE_MB="0",
               HEYGEM_X264_PRESET="ultrafast", NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / f"daemon-{time.monotonic_ns()}.log", "w")
    p = subprocess.Popen([sys.executable, "-c", daemon_script(delay)], cwd=tmp_path, env=env,
                         stdout=log, stderr=subprocess.STDOUT)
    return p, log


class Listener:
    """A systemd stand-in: reads $NOTIFY_SOCKET continuously (as systemd does) and keeps every message."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096))
            except (socket.timeout, OSError):
                continue

    def wait(self, text: bytes, timeout: float = 30) -> bool:
        return wait_for(lambda: any(text in m for m in self.messages), timeout)

    def close(self):
        self._stop.set()
        self._t.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    lst = Listener(str(tmp_path / "notify.sock"))
    yield lst, lst.path
    lst.close()


def running_task(var):
    with Ledger(var / "ledger.sqlite3") as led:
        rt = led.running_tasks()
        return rt[0] if rt and rt[0].progress_done > 0 else None


def test_sigterm_mid_render_exits_fast_and_requeues(tmp_path, face_template_file, notify):
    import shutil

    sock, path = notify
    var = tmp_path / "var"
    (var / "templates").mkdir(parents=True)
    shutil.copy(face_template_file, var / "templates")
    p, log = start_daemon(tmp_path, var, 0.05, path)
    try:
        assert sock.wait(b"READY=1")
        assert sock.wait(b"WATCHDOG=1", 5)  # pinged every WatchdogSec/2
        gen_media.write_wav(var / "incoming" / "live.wav", gen_media.speech(8.0))  # 200 frames, ~10 s to render
        assert wait_for(lambda: running_task(var) is not None, 30)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert time.monotonic() - t0 < 10
        assert sock.wait(b"STOPPING=1", 2)
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    with Ledger(var / "ledger.sqlite3") as led:
        assert led.counts()["queued"] == 1 and led.counts()["running"] == 0
        t = led.tasks_for(led.recent_recordings(1)[0].id)[0]
        assert (t.stops, t.crashes) == (1, 0)  # a clean stop, not a crash
    assert not list((var / "outputs").rglob("*.mp4")) and not list((var / "tmp").rglob(".partial-*"))
    assert (var / "incoming" / "live.wav").exists()


def test_kill_9_then_restart_gives_exactly_one_output(tmp_path, face_template_file, notify):
    import shutil

    sock, path = notify
    var = tmp_path / "var"
    (var / "templates").mkdir(parents=True)
    shutil.copy(face_template_file, var / "templates")
    p, log = start_daemon(tmp_path, var, 0.04, path)
    try:
        assert sock.wait(b"READY=1")
        # 200 frames at 40 ms: the first progress report (after 2 s) comes well before the end
        gen_media.write_wav(var / "incoming" / "crash.wav", gen_media.speech(8.0))
        assert wait_for(lambda: running_task(var) is not None, 30)
        p.kill()
        p.wait(5)
    finally:
        log.close()
    assert not list((var / "outputs").rglob("*.mp4"))
    p, log = start_daemon(tmp_path, var, 0.0, path)
    try:
        out = var / "outputs" / today() / "crash"
        assert wait_for(lambda: (out / "manifest.json").exists(), 60)
        assert [x.name for x in out.glob("*.mp4")] == ["anchor.mp4"]
        # the manifest is written before the source is moved (filing.finalise): on a busy box the move may not
        # have happened yet when the manifest appears
        assert wait_for(lambda: (var / "archive" / today() / "crash.wav").exists(), 10)
        with Ledger(var / "ledger.sqlite3") as led:
            tasks = led.tasks_for(led.recent_recordings(1)[0].id)
            assert [(t.state, t.attempts, t.crashes, t.stops) for t in tasks] == [("done", 2, 1, 0)]
        assert not list((var / "tmp").rglob(".partial-*"))
        p.send_signal(signal.SIGHUP)  # reload, keep running
        assert wait_for(lambda: '"reloaded"' in Path(log.name).read_text(), 10)
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        log.close()


def test_sd_notify_never_blocks_on_a_full_queue(tmp_path, env_clean):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    env_clean.setenv("NOTIFY_SOCKET", path)
    try:
        t0 = time.monotonic()
        results = [daemon_mod.sd_notify("WATCHDOG=1") for _ in range(500)]  # nobody reads: the queue fills up
        assert time.monotonic() - t0 < 5
        assert results[0] is True and results[-1] is False
    finally:
        s.close()


def test_retention_prunes_template_cache_no_template_needs(daemon_factory, face_template_file):
    import shutil

    d = daemon_factory()
    shutil.copy(face_template_file, d.settings.template_dir / "second.png")
    drop(d, "a.wav", 0.5)
    ingest_all(d)
    assert drain(d) == 2
    entries = sorted((d.settings.cache_dir / "templates").iterdir())
    assert len(entries) == 1  # anchor.png and second.png hold the same picture: one entry
    old = time.time() - 3 * 24 * 3600
    for p in [entries[0], *entries[0].iterdir()]:
        os.utime(p, (old, old))
    stale = d.settings.cache_dir / "templates" / ("f" * 32)
    stale.mkdir()
    (stale / "frames.yuv").write_bytes(b"x" * 100)
    os.utime(stale / "frames.yuv", (old, old))
    os.utime(stale, (old, old))
    d.retention()
    assert sorted((d.settings.cache_dir / "templates").iterdir()) == entries  # in use by the template folder
    # the templates are replaced: their old cache goes
    for t in list(d.settings.template_dir.iterdir()):
        t.unlink()
    d.retention()
    assert list((d.settings.cache_dir / "templates").iterdir()) == []
