"""daemon.py, the operator's side: start-up leftovers, SIGHUP that applies (or names) every key, fingerprints
reused across starts, templates checked when they appear."""
import json
import os
import time
from pathlib import Path

from heygem_watch import ingest as ingest_mod
from tests import gen_media
from tests.conftest import daemon_script, daemon_var, drain, wait_for


def today() -> str:
    return time.strftime("%Y-%m-%d")


def ingest_all(d) -> list[Path]:
    d.watcher.scan()
    return d.watcher.check()


def dead_pid() -> int:
    pid = 2**22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid -= 1


def test_startup_removes_half_written_template_cache_copies(daemon_factory):
    d = daemon_factory()
    base = d.settings.cache_dir / "templates"
    key = "a" * 32
    stale_tmp = base / f"{key}.tmp{dead_pid()}.140123"
    stale_old = base / f"{key}.old{dead_pid()}.140124"
    live = base / f"{key}.tmp1.140125"  # pid 1 is alive (another process analysing right now)
    entry = base / key
    for p in (stale_tmp, stale_old, live, entry):
        p.mkdir(parents=True)
        (p / "frames.yuv").write_bytes(b"x" * 1000)
    d.recover()
    assert sorted(p.name for p in base.iterdir()) == sorted([live.name, entry.name])


def test_sighup_moves_the_watcher_to_a_new_incoming_folder(daemon_factory, tmp_path, env_clean, capsys):
    d = daemon_factory()
    old_in = d.settings.incoming_dir
    new_in = tmp_path / "obs recordings"
    cfg = tmp_path / "config.env"
    cfg.write_text(f"HEYGEM_VAR_DIR={d.settings.var_dir}\nHEYGEM_INCOMING_DIR={new_in}\nHEYGEM_MIN_FREE_MB=0\n"
                   "HEYGEM_SETTLE_SECONDS=0\nHEYGEM_RESCAN_SECONDS=5\n")
    d.config_path = str(cfg)
    d.reload()
    assert d.settings.incoming_dir == new_in and d.watcher.incoming == new_in
    gen_media.write_wav(old_in / "old.wav", gen_media.speech(0.3))
    gen_media.write_wav(new_in / "new.wav", gen_media.speech(0.3, seed=2))
    assert ingest_all(d) == [new_in / "new.wav"]
    assert drain(d) == 1 and (d.settings.outputs_dir / today() / "new" / "anchor.mp4").exists()
    ev = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"reloaded"' in x][-1]
    assert "HEYGEM_INCOMING_DIR" in ev["applied"] and ev["restart_needed"] == {}


def test_sighup_names_keys_that_need_a_restart_and_keeps_their_old_values(daemon_factory, tmp_path, env_clean,
                                                                            capsys):
    d = daemon_factory()
    var = d.settings.var_dir
    cfg = tmp_path / "config.env"
    cfg.write_text(f"HEYGEM_VAR_DIR={tmp_path / 'elsewhere'}\nHEYGEM_MIN_FREE_MB=0\nHEYGEM_ON_DONE=keep\n"
                   "HEYGEM_WEB_PORT=9999\nHEYGEM_VISIBILITY_TIMEOUT=60\n")
    d.config_path = str(cfg)
    d.reload()
    assert d.settings.var_dir == var and d.settings.on_done == "keep"
    ev = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"reloaded"' in x][-1]
    assert set(ev["restart_needed"]) == {"HEYGEM_VAR_DIR", "HEYGEM_WEB_PORT", "HEYGEM_VISIBILITY_TIMEOUT"}
    assert d.settings.visibility_timeout != 60
    assert "HEYGEM_ON_DONE" in ev["applied"] and "HEYGEM_VAR_DIR" not in ev["applied"]


def test_queued_files_are_not_hashed_again_at_each_start(daemon_factory, passthrough_engine, monkeypatch):
    from heygem_watch.daemon import Daemon

    d = daemon_factory(HEYGEM_MIN_FREE_MB=str(10**9))  # the disk guard keeps everything queued
    for i in range(3):
        gen_media.write_wav(d.settings.incoming_dir / f"r{i}.wav", gen_media.speech(0.3, seed=i))
    assert len(ingest_all(d)) == 3
    d.ledger.close()
    hashed = []
    real = ingest_mod.fingerprint_file
    monkeypatch.setattr(ingest_mod, "fingerprint_file", lambda p: hashed.append(Path(p).name) or real(p))
    d2 = Daemon(d.settings, engine=passthrough_engine)  # a restart: the start-up scan sees them all again
    d2.recover()
    assert len(ingest_all(d2)) == 3 and hashed == []
    assert d2.ledger.counts()["queued"] == 3  # still one task each
    p = d.settings.incoming_dir / "r1.wav"
    gen_media.write_wav(p, gen_media.speech(0.3, seed=9))  # replaced: new content, new size/mtime
    ingest_all(d2)
    assert hashed == ["r1.wav"]
    d2.watcher.stop()
    d2.ledger.close()


def test_a_template_is_checked_when_it_appears(daemon_factory, faceless_template_file):
    import shutil

    d = daemon_factory()
    d.check_templates()
    shutil.copy(faceless_template_file, d.settings.template_dir / "wall.png")
    d.watcher.scan()  # the periodic rescan job also looks at the template folder
    d.rescan()
    checks = {c["name"]: c for c in d.ledger.template_checks().values()}
    assert checks["anchor.png"]["usable"] and not checks["wall.png"]["usable"]


def test_a_file_in_the_template_folder_of_a_type_not_read_is_logged_once(daemon_factory, capsys):
    d = daemon_factory()
    (d.settings.template_dir / "IMG_0001.HEIC").write_bytes(b"an iPhone photo")
    d.check_templates()
    d.check_templates()  # the periodic rescan
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "template_file_not_used" in ln]
    assert len(lines) == 1 and "IMG_0001.HEIC" in lines[0] and "JPEG" in lines[0]
    assert [c["name"] for c in d.ledger.template_checks().values()] == ["anchor.png"]


def test_sighup_to_the_running_daemon_watches_the_new_folder(tmp_path, face_template_file):
    import signal
    import subprocess
    import sys

    var, env = daemon_var(tmp_path, face_template_file)
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-c", daemon_script()], cwd=tmp_path, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: '"ready"' in log.read_text(), 60, 0.1)
        obs = tmp_path / "obs"
        obs.mkdir()  # where OBS now records
        (tmp_path / "config.env").write_text(f"HEYGEM_INCOMING_DIR={obs}\n")
        p.send_signal(signal.SIGHUP)
        assert wait_for(lambda: '"reloaded"' in log.read_text(), 60, 0.1)
        gen_media.write_wav(obs / "moved.wav", gen_media.speech(0.3))
        gen_media.write_wav(var / "incoming" / "old place.wav", gen_media.speech(0.3, seed=4))
        assert wait_for(lambda: (var / "outputs" / today() / "moved" / "manifest.json").exists(), 60, 0.1)
        time.sleep(1.0)  # the old folder is no longer watched
        assert (var / "incoming" / "old place.wav").exists()
        assert not (var / "outputs" / today() / "old place").exists()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(15)
