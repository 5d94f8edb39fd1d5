"""The torture scenarios of issue #11, with small generated media: disk full at every stage of a task, clean
stops vs crashes, two daemons on one var/, a partial recording completed by re-dropping or `retry`, and unusable
or duplicate copies that must each end where their original does."""
import collections
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heygem_watch import filing, pipeline
from heygem_watch.engines.base import Engine
from heygem_watch.ledger import MAX_ATTEMPTS, Ledger
from heygem_watch.media import VideoWriter
from tests import gen_media
from tests.conftest import daemon_script, daemon_var, drain, wait_for

ROOT = Path(__file__).resolve().parents[1]
Usage = collections.namedtuple("Usage", "total used free")


def today() -> str:
    return time.strftime("%Y-%m-%d")


def drop(d, name, seconds=0.6, seed=0) -> Path:
    p = d.settings.incoming_dir / name
    gen_media.write_wav(p, gen_media.speech(seconds, seed=seed))
    return p


def ingest_all(d) -> list[Path]:
    d.watcher.scan()
    return d.watcher.check()


def events(out: str, name: str) -> list[dict]:
    found = []
    for line in out.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == name:
            found.append(e)
    return found


# -- 1: disk full anywhere in a task -------------------------------------------------------------------------
def _full_os(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_db(*_a, **_k):
    raise sqlite3.OperationalError("database or disk is full")


def Once(orig, fail, before=None):
    """orig, except that its first call raises through `fail` (a function, so it binds as a method too)."""
    left = [1]

    def wrapped(*a, **k):
        if left[0]:
            left[0] = 0
            if before:
                before(*a, **k)
            fail()
        return orig(*a, **k)

    return wrapped


def _half_audio(recording, work_dir):
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    (Path(work_dir) / "audio16k.f32").write_bytes(b"\0" * 4096)  # what a full disk leaves half-written


STAGES = {
    "audio": lambda mp: mp.setattr(pipeline, "extract_audio",
                                   Once(pipeline.extract_audio, _full_os, before=_half_audio)),
    "encode": lambda mp: mp.setattr(VideoWriter, "write", Once(VideoWriter.write, _full_os)),
    "progress": lambda mp: mp.setattr(Ledger, "update_progress", Once(Ledger.update_progress, _full_db)),
    "commit": lambda mp: mp.setattr(Ledger, "finish_task", Once(Ledger.finish_task, _full_db)),
    "claim": lambda mp: mp.setattr(Ledger, "claim_next_task", Once(Ledger.claim_next_task, _full_db)),
    "manifest": lambda mp: mp.setattr(filing, "write_json_atomic", Once(filing.write_json_atomic, _full_os)),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_disk_full_at_any_stage_pauses_keeps_the_task_and_resumes(daemon_factory, monkeypatch, capsys, stage):
    d = daemon_factory()
    src = drop(d, "full.wav", 2.2)  # 55 frames: the pipeline reports progress before the end
    ingest_all(d)
    free = {"mb": 5000}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, free["mb"] << 20))
    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.0)
    STAGES[stage](monkeypatch)
    capsys.readouterr()
    for _ in range(3):  # the failing attempt, then the pause holds
        assert d.run_one() is None or stage != "claim"
    out = capsys.readouterr().out
    tasks = d.ledger.tasks_for(d.ledger.recent_recordings(1)[0].id)
    if stage != "manifest":
        assert [t.state for t in tasks] == ["queued"], stage
        assert tasks[0].crashes == 0 and tasks[0].error is None
    low = events(out, "disk_low")
    assert len(low) == 1 and "full" in low[0]["reason"], out
    assert "Traceback" not in out and not events(out, "worker_error") and not events(out, "task_failed")
    assert not events(out, "audio_failed")
    assert list(d.settings.tmp_dir.rglob("*")) == [], "left under var/tmp"
    assert src.exists() and not list(d.settings.failed_dir.rglob("*.json"))
    free["mb"] += 2000  # space comes back: the daemon resumes on its own
    drain(d)
    out = capsys.readouterr().out
    assert events(out, "disk_ok")
    rec = d.ledger.recent_recordings(1)[0]
    assert rec.state == "done" and [t.state for t in d.ledger.tasks_for(rec.id)] == ["done"]
    assert (d.settings.outputs_dir / today() / "full" / "anchor.mp4").exists()
    assert (d.settings.outputs_dir / today() / "full" / "manifest.json").exists()
    assert (d.settings.archive_dir / today() / "full.wav").exists()
    assert list(d.settings.tmp_dir.rglob("*")) == []


# -- 2: clean stops are not crashes --------------------------------------------------------------------------
class CancelAt(Engine):
    """Passthrough that raises the daemon's cancel flag after n frames (SIGTERM mid-render) while armed."""

    name = "cancel-at"

    def __init__(self, n):
        self.n, self.daemon, self.armed = n, None, True

    def render(self, template, state, speech, jobs):
        for j in jobs:
            if self.armed and j.index == self.n and self.daemon is not None:
                self.daemon.cancel.set()
            yield j.image


def test_restarts_during_a_long_render_and_one_crash_do_not_fail_the_task(daemon_factory, passthrough_engine):
    from heygem_watch.daemon import Daemon

    eng = CancelAt(5)
    d = daemon_factory(engine=eng)
    eng.daemon = d
    drop(d, "long.wav", 1.0)
    ingest_all(d)
    for _ in range(MAX_ATTEMPTS + 1):  # more clean stops (systemctl restart) than the crash limit
        t = d.run_one()
        assert d.ledger.task(t.id).state == "queued"
    d.ledger.claim_next_task()  # one real crash: the process dies with the task running
    d.ledger.close()
    d2 = Daemon(d.settings, engine=passthrough_engine)
    d2.recover()
    t = d2.ledger.task(t.id)
    assert t.state == "queued" and t.crashes == 1 and t.stops == MAX_ATTEMPTS + 1
    assert drain(d2) == 1 and d2.ledger.task(t.id).state == "done"
    d2.ledger.close()


def test_real_crashes_still_fail_the_task_and_the_message_counts_both(tmp_path):
    with Ledger(tmp_path / "l.sqlite3") as led:
        led.add_recording("/in/a.flv", "fa", 1, [("/t/x.png", "fx")], output_dir="/out/a")
        for _ in range(2):
            t = led.claim_next_task()
            led.requeue_task(t.id)  # clean stops
        for _ in range(MAX_ATTEMPTS):
            led.claim_next_task()
            led.requeue_running()  # crash, restart
        t = led.task(t.id)
        assert t.state == "failed" and t.crashes == MAX_ATTEMPTS and t.stops == 2
        assert f"{MAX_ATTEMPTS} crash" in t.error and "2 clean stop" in t.error


# -- 3: one daemon per var/ ----------------------------------------------------------------------------------
def test_second_daemon_on_the_same_var_exits_with_the_first_ones_pid(tmp_path, face_template_file):
    var, env = daemon_var(tmp_path, face_template_file, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-c", daemon_script()], cwd=tmp_path, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: '"ready"' in (tmp_path / "first.log").read_text(), 60, 0.1)
        second = subprocess.Popen([sys.executable, "-m", "heygem_watch.cli", "run"], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            said = second.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:  # it started beside the first one
            second.terminate()
            said = second.communicate(timeout=15)[0]
        assert second.returncode != 0
        assert f"another heygem-watch (pid {first.pid}) is using {var}" in said
        assert first.poll() is None
        # the dashboard and `status` still read and write the same var/ meanwhile
        st = subprocess.run([sys.executable, "-m", "heygem_watch.cli", "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 0 and "tasks:" in st.stdout
        assert "not running" not in st.stdout  # the refused second start did not mark the first one stopped
        # and the first daemon still renders what arrives
        gen_media.write_wav(var / "incoming" / "one.wav", gen_media.speech(0.4))
        out = var / "outputs" / today() / "one" / "manifest.json"
        wait_for(out.exists, 60, 0.1)
        assert out.exists()
    finally:
        first.terminate()
        first.wait(15)
        log.close()
    # the lock goes with the process: the next start works
    assert "stopped" in (tmp_path / "first.log").read_text()


def test_lock_is_released_on_stop_and_refused_while_held(daemon_factory):
    from heygem_watch.housekeeping import VarLocked, lock_var

    d = daemon_factory()
    held = lock_var(d.settings.var_dir)
    with pytest.raises(VarLocked) as exc:
        lock_var(d.settings.var_dir)
    assert f"pid {os.getpid()}" in str(exc.value) and str(d.settings.var_dir) in str(exc.value)
    held.close()
    lock_var(d.settings.var_dir).close()


# -- 4: a partial recording can be completed ------------------------------------------------------------------
class FailFor(Engine):
    """Passthrough, except for templates named in `broken` (a transient render failure)."""

    name = "fail-for"

    def __init__(self, *broken):
        self.broken = set(broken)
        self.rendered: list[str] = []

    def render(self, template, state, speech, jobs):
        if template.path.name in self.broken:
            raise RuntimeError(f"engine failed on {template.path.name}")
        self.rendered.append(template.path.name)
        for j in jobs:
            yield j.image


def _partial(daemon_factory, face_template_file):
    eng = FailFor("flaky.png")
    d = daemon_factory(engine=eng)
    gen_media.face_png(d.settings.template_dir / "flaky.png", size=(200, 240))
    src = drop(d, "show.wav", 0.5)
    ingest_all(d)
    drain(d)
    rec = d.ledger.recent_recordings(1)[0]
    assert rec.state == "partial" and eng.rendered == ["anchor.png"]
    return d, eng, src, rec


def test_redropping_a_partial_recording_requeues_exactly_its_failed_tasks(daemon_factory, face_template_file):
    d, eng, src, rec = _partial(daemon_factory, face_template_file)
    archived = d.settings.archive_dir / today() / "show.wav"
    done_before = {t.template_name: t for t in d.ledger.tasks_for(rec.id)}
    eng.broken.clear()
    shutil.copy(archived, d.settings.incoming_dir / "show again.wav")
    ingest_all(d)
    assert [t.state for t in d.ledger.tasks_for(rec.id)] == ["done", "queued"]
    assert drain(d) == 1
    assert eng.rendered == ["anchor.png", "flaky.png"]  # anchor was never redone
    rec = d.ledger.recording(rec.id)
    tasks = {t.template_name: t for t in d.ledger.tasks_for(rec.id)}
    assert rec.state == "done" and tasks["anchor.png"].finished_at == done_before["anchor.png"].finished_at
    out = Path(rec.output_dir)
    assert sorted(p.name for p in out.glob("*.mp4")) == ["anchor.mp4", "flaky.mp4"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["state"] == "done" and [t["status"] for t in man["templates"]] == ["done", "done"]
    assert not (d.settings.incoming_dir / "show again.wav").exists()
    assert not d.ledger.events("duplicate") or all(e["detail"].get("queued") for e in d.ledger.events("duplicate"))


@pytest.mark.parametrize("ref", ["id", "name"])
def test_retry_command_requeues_failed_tasks_from_the_archive(daemon_factory, face_template_file, capsys,
                                                              env_clean, ref):
    monkeypatch = env_clean
    from heygem_watch import cli

    d, eng, src, rec = _partial(daemon_factory, face_template_file)
    eng.broken.clear()
    monkeypatch.chdir(d.settings.var_dir.parent)
    monkeypatch.setenv("HEYGEM_VAR_DIR", str(d.settings.var_dir))
    capsys.readouterr()
    assert cli.main(["retry", str(rec.id) if ref == "id" else "show.wav"]) == 0
    out = capsys.readouterr().out
    assert "flaky.png" in out and "queued" in out
    assert drain(d) == 1
    assert d.ledger.recording(rec.id).state == "done" and eng.rendered == ["anchor.png", "flaky.png"]
    assert (d.settings.archive_dir / today() / "show.wav").exists()  # the source stays where it was filed
    assert not list((d.settings.archive_dir / today()).glob("show-*"))
    assert cli.main(["retry", str(rec.id)]) == 1  # nothing failed any more
    assert "no failed tasks" in capsys.readouterr().err
    assert cli.main(["retry", "no such recording"]) == 1


def test_retry_of_a_failed_recording_renders_from_failed_and_files_it_in_the_archive(daemon_factory, env_clean,
                                                                                    capsys):
    from heygem_watch import cli

    eng = FailFor("anchor.png")
    d = daemon_factory(engine=eng)
    drop(d, "bad day.wav", 0.4)
    ingest_all(d)
    drain(d)
    failed = d.settings.failed_dir / today() / "bad day.wav"
    assert failed.exists() and (failed.parent / "bad day.wav.error.json").exists()
    eng.broken.clear()
    env_clean.setenv("HEYGEM_VAR_DIR", str(d.settings.var_dir))
    assert cli.main(["retry", "bad day"]) == 0
    assert drain(d) == 1
    rec = d.ledger.recent_recordings(1)[0]
    assert rec.state == "done" and rec.final_path == str(d.settings.archive_dir / today() / "bad day.wav")
    assert not failed.exists() and not (failed.parent / "bad day.wav.error.json").exists()
    assert (Path(rec.output_dir) / "anchor.mp4").exists()


# -- 6: unusable files are never duplicates --------------------------------------------------------------------
def test_two_empty_flvs_each_end_in_failed_with_their_own_error(daemon_factory):
    d = daemon_factory()
    a, b = d.settings.incoming_dir / "a.flv", d.settings.incoming_dir / "b.flv"
    a.write_bytes(b"")
    b.write_bytes(b"")
    assert ingest_all(d) == [a, b]
    drain(d)
    failed = d.settings.failed_dir / today()
    for name in ("a.flv", "b.flv"):
        assert (failed / name).exists(), name
        err = json.loads((failed / f"{name}.error.json").read_text())
        assert "empty" in err["reason"]
    assert not list(d.settings.archive_dir.rglob("*.flv"))


def test_copy_of_a_queued_unusable_recording_follows_it_to_failed(daemon_factory):
    d = daemon_factory()
    a, b = d.settings.incoming_dir / "one.flv", d.settings.incoming_dir / "two.flv"
    gen_media.text_file(a)
    shutil.copy(a, b)
    assert ingest_all(d) == [a, b]
    assert b.exists() and not list(d.settings.archive_dir.rglob("*"))  # not archived while the original waits
    drain(d)
    failed = d.settings.failed_dir / today()
    for name in ("one.flv", "two.flv"):
        assert (failed / name).exists(), name
        assert json.loads((failed / f"{name}.error.json").read_text())["reason"]
    assert not list(d.settings.archive_dir.rglob("*.flv")) and not b.exists()


def test_copy_of_a_queued_good_recording_is_archived_only_after_it(daemon_factory):
    d = daemon_factory()
    a = drop(d, "orig.wav", 0.4)
    assert ingest_all(d) == [a]
    b = d.settings.incoming_dir / "copy.wav"
    shutil.copy(a, b)
    assert ingest_all(d) == [b]
    assert b.exists() and not list(d.settings.archive_dir.rglob("*"))
    assert drain(d) == 1
    assert not a.exists() and not b.exists()
    names = sorted(p.name for p in (d.settings.archive_dir / today()).iterdir())
    assert names == ["copy.wav", "orig.wav"]
    assert d.ledger.recording_counts()["done"] == 1
