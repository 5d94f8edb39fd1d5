"""cli.py: wiring, exit codes, summaries; `import heygem_watch.cli` stays light; the systemd unit verifies."""
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from heygem_watch import cli
from tests import gen_media, mediagen

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "heygem-watch.service"


@pytest.fixture
def in_tmp(tmp_path, env_clean):
    env_clean.chdir(tmp_path)
    env_clean.setenv("HEYGEM_MIN_FREE_MB", "0")
    env_clean.setenv("HEYGEM_X264_PRESET", "ultrafast")
    return tmp_path


def test_import_is_light():
    code = "import sys, heygem_watch.cli; print(sorted(m for m in ('numpy', 'av', 'cv2', 'mediapipe', " \
           "'onnxruntime', 'structlog', 'watchdog', 'apscheduler') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


BLAS_THREADS = "import numpy, threadpoolctl; print(max(p['num_threads'] for p in threadpoolctl.threadpool_info() " \
               "if p['user_api'] == 'blas'))"
POOL_ENV = ("OPENBLAS_NUM_THREADS", "OPENCV_THREAD_POOL_ACTIVE_WAIT_WORKER", "OPENCV_THREAD_POOL_ACTIVE_WAIT_MAIN")


def _blas_threads(setup: str, env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", f"{setup}\n{BLAS_THREADS}"], capture_output=True, text=True,
                         cwd=ROOT, env=env, check=True)
    return int(out.stdout.split()[-1])


def test_thread_pools_are_quieted_before_numpy_loads_unless_the_operator_chose():
    env = {k: v for k, v in os.environ.items() if k not in POOL_ENV + ("OMP_NUM_THREADS",)}
    quiet = "from heygem_watch import cli; cli._quiet_thread_pools({})"
    assert _blas_threads(quiet.format(True), env) == 1
    default = _blas_threads("", env)
    assert _blas_threads(quiet.format(False), env) == default  # train-speech keeps threaded BLAS
    assert _blas_threads(quiet.format(True), dict(env, OPENBLAS_NUM_THREADS="2")) == 2  # the operator's value wins


def test_command_line_runs_quiet_the_pools_and_train_speech_keeps_blas(in_tmp, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in POOL_ENV}
    show = "import os, sys; from heygem_watch import cli; sys.argv = ['heygem-watch'] + sys.argv[1:]; " \
           "rc = cli.main(); print([os.environ.get(k) for k in {}])".format(POOL_ENV)

    def run(*args):
        out = subprocess.run([sys.executable, "-c", show, *args], capture_output=True, text=True, cwd=in_tmp,
                             env=dict(env, PYTHONPATH=str(ROOT)))
        return out.stdout.strip().splitlines()[-1]

    assert run("status") == "['1', '0', '0']"
    assert run("train-speech", "--corpus", str(in_tmp / "none"), "--out", str(in_tmp / "h.npz")) == \
        "[None, '0', '0']"
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    cli.main(["status"])  # tests call main(argv) inside their own process: nothing is set there
    assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_bad_config_exit_code_names_the_key(in_tmp, capsys):
    os.environ["HEYGEM_ON_DONE"] = "shred"
    assert cli.main(["status"]) == cli.EXIT_CONFIG
    assert "HEYGEM_ON_DONE" in capsys.readouterr().err


def test_status_before_and_after_work(in_tmp, capsys, daemon_factory):
    assert cli.main(["status"]) == 0
    assert "no ledger yet" in capsys.readouterr().out
    d = daemon_factory()  # var/ under tmp_path, the cwd
    gen_media.write_wav(d.settings.incoming_dir / "show one.wav", gen_media.speech(0.3))
    gen_media.write_wav(d.settings.incoming_dir / "show two.wav", gen_media.speech(0.3, seed=3))
    d.watcher.scan()
    d.watcher.check()
    d.run_one()
    t = d.ledger.claim_next_task()
    d.ledger.update_progress(t.id, 40, 100, 12.5, 4.8)
    capsys.readouterr()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "queued 0  running 1  done 1  failed 0" in out
    assert "40/100 frames (40%), 12.5 fps, ETA 5 s" in out
    assert "show one.wav" in out and "show two.wav" in out and " done " in out


def test_status_says_when_the_renderer_is_not_running(in_tmp, capsys, daemon_factory):
    """Issue 11 item 12: work waits in the queue and no daemon runs -> `status` says so, and since when."""
    d = daemon_factory()
    gen_media.write_wav(d.settings.incoming_dir / "waiting.wav", gen_media.speech(0.3))
    d.watcher.scan()
    d.watcher.check()  # queued; this daemon was never started, so nothing renders it
    capsys.readouterr()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "renderer not running" in out and "queued tasks wait" in out
    d.beat()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "renderer running" in out and "not running" not in out
    d.stop()  # a clean stop says so at once, with the time
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "renderer not running since " + time.strftime("%Y-%m-%d") in out


def test_process_batch_and_single(in_tmp, monkeypatch, capsys, passthrough_engine, face_template_file,
                                  faceless_template_file):
    from heygem_watch import engines

    monkeypatch.setattr(engines, "create_engine", lambda name, model=None, **kw: passthrough_engine)
    rec = gen_media.write_av(in_tmp / "-my rec.flv", 0.6)
    t1 = str(shutil.copy(face_template_file, in_tmp / "a face.png"))
    rc = cli.main(["process", str(rec), "--template", t1, "--template", str(faceless_template_file),
                   "--out-dir", str(in_tmp / "out")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1  # one template had no face
    assert out[0].startswith("OK   a face.png") and out[1].startswith("FAIL wall.png") and "no face" in out[1]
    assert (in_tmp / "out" / "a face.mp4").exists() and not (in_tmp / "out" / "wall.mp4").exists()
    (in_tmp / "other").mkdir()
    t2 = str(shutil.copy(face_template_file, in_tmp / "other" / "a face.png"))
    assert cli.main(["process", str(rec), "-t", t1, "-t", t2, "--out-dir", str(in_tmp / "same")]) == 0
    assert sorted(p.name for p in (in_tmp / "same").iterdir()) == ["a face-2.mp4", "a face.mp4"]
    assert cli.main(["process", str(rec), "-t", t1, "--output", str(in_tmp / "single.mp4")]) == 0
    assert (in_tmp / "single.mp4").exists()
    assert not (in_tmp / "var" / "ledger.sqlite3").exists()  # no ledger in process mode
    assert cli.main(["process", "-t", t1, "--output=-dash.mp4", "--", "-my rec.flv"]) == 0  # leading '-' names
    assert (in_tmp / "-dash.mp4").exists()
    assert cli.main(["process", str(rec), "-t", t1, "-t", t2, "--output", str(in_tmp / "x.mp4")]) == cli.EXIT_CONFIG
    bad = gen_media.text_file(in_tmp / "bad.flv")
    capsys.readouterr()
    assert cli.main(["process", str(bad), "-t", t1, "--output", str(in_tmp / "y.mp4")]) == 1
    assert "recording unusable" in capsys.readouterr().out


def test_process_names_a_missing_speech_detector_per_template(in_tmp, capsys, face_template_file,
                                                              no_speech_detector):
    """The real built-in engine without its speech detector: each template fails with the reason and the fix, no
    traceback (it used to escape as an uncaught EngineError and abort the process under a running FaceMesh)."""
    rec = gen_media.write_av(in_tmp / "rec.flv", 0.6)
    t1 = str(shutil.copy(face_template_file, in_tmp / "a.png"))
    t2 = str(shutil.copy(face_template_file, in_tmp / "b.png"))
    rc = cli.main(["process", str(rec), "-t", t1, "-t", t2, "--out-dir", str(in_tmp / "out"), "--engine", "builtin"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1 and len(out) == 2
    for line, name in zip(out, ("a.png", "b.png")):
        assert line.startswith(f"FAIL {name}: the silero-vad package") and "pip install --no-deps" in line
    assert not (in_tmp / "out").exists() or not any((in_tmp / "out").iterdir())


def test_process_from_the_command_line_exits_with_its_status(in_tmp):
    """A command-line `process` ends with os._exit (no interpreter teardown): its lines still reach a pipe and its
    exit status is the run's."""
    bad = gen_media.text_file(in_tmp / "bad.flv")
    tpl = gen_media.write_av(in_tmp / "t.mp4", 0.4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEYGEM_CACHE_DIR": str(in_tmp / "c")}
    run = subprocess.run([sys.executable, "-m", "heygem_watch.cli", "process", str(bad), "-t", str(tpl),
                          "--output", str(in_tmp / "o.mp4"), "--engine", "builtin"],
                         capture_output=True, text=True, cwd=in_tmp, env=env, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stdout.startswith("FAIL bad.flv: recording unusable")


def test_process_keeps_its_cache_in_the_user_cache_dir_not_in_the_cwd(in_tmp, monkeypatch, capsys,
                                                                      passthrough_engine, face_template_file):
    from heygem_watch import engines

    monkeypatch.setattr(engines, "create_engine", lambda name, model=None, **kw: passthrough_engine)
    work = in_tmp / "somewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    xdg = in_tmp / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    rec = gen_media.write_av(in_tmp / "rec.flv", 0.4)
    tpl = str(shutil.copy(face_template_file, in_tmp / "face.png"))
    assert cli.main(["process", str(rec), "-t", tpl, "--output", str(in_tmp / "a.mp4")]) == 0
    assert list(work.iterdir()) == []  # no ./var (cache, tmp) left where it ran
    assert len(list((xdg / "heygem-watch" / "templates").iterdir())) == 1
    # HEYGEM_CACHE_DIR wins; --no-cache keeps nothing anywhere
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(in_tmp / "mine"))
    assert cli.main(["process", str(rec), "-t", tpl, "--output", str(in_tmp / "b.mp4")]) == 0
    assert len(list((in_tmp / "mine" / "templates").iterdir())) == 1
    shutil.rmtree(xdg)
    shutil.rmtree(in_tmp / "mine")
    assert cli.main(["process", str(rec), "-t", tpl, "--output", str(in_tmp / "c.mp4"), "--no-cache"]) == 0
    assert (in_tmp / "c.mp4").exists() and not xdg.exists() and not (in_tmp / "mine").exists()
    assert list(work.iterdir()) == []
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    monkeypatch.delenv("HEYGEM_CACHE_DIR")
    assert cli.main(["process", str(rec), "-t", tpl, "--output", str(in_tmp / "d.mp4")]) == 0
    assert (in_tmp / "home" / ".cache" / "heygem-watch" / "templates").is_dir()


def test_status_and_check_show_an_unusable_template(in_tmp, capsys, daemon_factory, faceless_template_file):
    d = daemon_factory(templates=(faceless_template_file,))
    d.check_templates()
    capsys.readouterr()
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "template wall.png: unusable, skipped: no face found" in out


def test_check_reports_problems_with_fixes(in_tmp, capsys, face_template_file, faceless_template_file):
    tdir = in_tmp / "var" / "templates"
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  no templates" in out and "fix:" in out and "onnxruntime" in out
    tdir.mkdir(parents=True)
    shutil.copy(face_template_file, tdir)
    assert cli.main(["check"]) == 0, capsys.readouterr().out
    shutil.copy(faceless_template_file, tdir)
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "ok       template anchor.png" in out
    assert "PROBLEM  template wall.png: unusable, recordings skip it: no face" in out
    (tdir / "IMG_0001.HEIC").write_bytes(b"not read")
    (tdir / ".hidden").write_bytes(b"")
    cli.main(["check"])
    out = capsys.readouterr().out
    assert "note     IMG_0001.HEIC in the templates folder is not used: not a video or image type" in out
    assert ".hidden" not in out
    assert "ok       speech model shipped" in out and "Whisper base verified; silero-vad 6.2.3 verified" in out


def test_check_says_how_a_template_is_changed_for_the_outputs(in_tmp, capsys):
    tdir = in_tmp / "var" / "templates"
    tdir.mkdir(parents=True)
    stored = [np.ascontiguousarray(np.rot90(f, -1)) for f in mediagen.face_frames(3)]  # 384 x 320 as shown
    mediagen.write_video(tdir / "phone.mp4", stored, 25, display=(90, False))
    in_tmp.joinpath("config.env").write_text("HEYGEM_MAX_SIDE=256\n")
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "ok       template phone.mp4: 256x214, 3 frames, face in 100% (stored 320x384, turned 90° counter-" \
           "clockwise on display: used upright as players show it; 384x320 scaled to 256x214 (HEYGEM_MAX_SIDE=256))" \
           in out, out


def test_check_names_a_missing_speech_detector(in_tmp, capsys, no_speech_detector):
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  speech model: the silero-vad package" in out and "pip install --no-deps silero-vad==6.2.3" in out
    assert "fix: reinstall heygem-watch's dependencies (./setup.sh)" in out and "fix HEYGEM_SPEECH_MODEL" not in out


def test_check_with_the_speech_detector_off_does_not_need_it(in_tmp, monkeypatch, capsys, no_speech_detector):
    monkeypatch.setenv("HEYGEM_SPEECH_DETECTOR", "false")
    cli.main(["check"])
    out = capsys.readouterr().out
    assert "ok       speech model shipped" in out and "speech detector off (HEYGEM_SPEECH_DETECTOR=false" in out
    assert "silero-vad" not in out


def test_check_names_a_broken_speech_model(in_tmp, monkeypatch, capsys):
    junk = in_tmp / "speech.npz"
    junk.write_bytes(b"not a model")
    monkeypatch.setenv("HEYGEM_SPEECH_MODEL", str(junk))
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM  speech model: {junk}: not a speech model" in out and "HEYGEM_SPEECH_MODEL" in out


def test_check_reports_a_missing_model(in_tmp, capsys):
    os.environ["HEYGEM_MODEL"] = str(in_tmp / "nope.onnx")
    assert cli.main(["check"]) == 1
    assert "PROBLEM  model" in capsys.readouterr().out


def test_check_verifies_the_speech_detector_for_the_onnx_engine(in_tmp, monkeypatch, capsys):
    from heygem_watch import vad
    from tests.test_onnx_engine import tiny_model

    monkeypatch.setenv("HEYGEM_MODEL", str(tiny_model(in_tmp / "w.onnx", "identity")))
    cli.main(["check"])
    out = capsys.readouterr().out
    assert "ok       engine onnx" in out and "ok       speech detector silero-vad 6.2.3 verified" in out
    monkeypatch.setattr(vad, "model_bytes", lambda: (_ for _ in ()).throw(vad.VadModelError("silero-vad: damaged")))
    cli.main(["check"])
    out = capsys.readouterr().out
    assert "PROBLEM  speech detector: silero-vad: damaged" in out and "HEYGEM_SPEECH_DETECTOR=false" in out
    monkeypatch.setenv("HEYGEM_SPEECH_DETECTOR", "false")
    cli.main(["check"])
    assert "speech detector" not in capsys.readouterr().out


def test_check_says_when_several_models_leave_auto_undecided(in_tmp, capsys):
    models = in_tmp / "models"
    models.mkdir(exist_ok=True)
    (models / "a.onnx").write_bytes(b"x")
    (models / "b.onnx").write_bytes(b"x")
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "2 .onnx files" in out and "set HEYGEM_MODEL" in out


def test_export_model_and_web_are_delegated(in_tmp, monkeypatch):
    seen = {}
    export = types.ModuleType("heygem_watch.engines.onnx.export")
    export.cli_export = lambda args: seen.setdefault("export", (args.checkpoint, args.output, args.opset, args.fp16)) and 0
    server = types.ModuleType("heygem_watch.web.server")
    server.cli_web = lambda args, settings: seen.setdefault("web", (args.host, args.port, settings.web_port)) and 7
    monkeypatch.setitem(sys.modules, "heygem_watch.engines.onnx.export", export)
    monkeypatch.setitem(sys.modules, "heygem_watch.web.server", server)
    assert cli.main(["export-model", "w.pth", "w.onnx", "--opset", "13", "--fp16"]) == 0
    assert seen["export"] == (Path("w.pth"), Path("w.onnx"), 13, True)
    assert cli.main(["web", "--port", "9000"]) == 7
    assert seen["web"] == (None, 9000, 7860)


def _verify_unit(exe: str, text: str, name: str) -> None:
    """`systemd-analyze verify` is clean and `security` scores <= 2.0 for the unit text, saved as `name` with its
    ExecStart pointed at this checkout's installed entry point (verify checks that it exists)."""
    import tempfile

    local = Path(sys.executable).parent / "heygem-watch"
    assert local.exists(), "pip install -e . first (./setup.sh)"
    with tempfile.TemporaryDirectory() as d:
        unit = Path(d) / name
        unit.write_text(text.replace("/opt/heygem-watch/.venv/bin/heygem-watch", str(local)))
        r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True)
        assert r.returncode == 0 and name not in r.stderr, r.stderr
        sec = subprocess.run([exe, "security", "--offline=true", str(unit)], capture_output=True, text=True)
        if sec.returncode == 0 or "exposure level" in sec.stdout:
            score = float(sec.stdout.split(f"exposure level for {name}:")[1].split()[0])
            print(f"{name}: systemd-analyze security exposure {score}")
            assert score <= 2.0


def test_systemd_unit_verifies():
    exe = shutil.which("systemd-analyze")
    if exe is None:
        print("systemd-analyze not installed (Debian package 'systemd'); ./setup.sh installs it when run as root")
        pytest.skip("systemd-analyze not installed")
    text = UNIT.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "EnvironmentFile=", "User=heygem",
                   "ProtectSystem=strict", "ReadWritePaths=", "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes"):
        assert needed in text, needed
    _verify_unit(exe, text, "heygem-watch.service")


def test_worker_systemd_unit_verifies_and_is_hardened_like_the_head():
    """systemd/heygem-watch-worker.service: verify + security like the head's unit, but the broker is reachable."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    head = UNIT.read_text()
    text = (ROOT / "systemd" / "heygem-watch-worker.service").read_text()
    assert "heygem-watch worker" in text and "HEYGEM_CACHE_DIR=" in text and "EnvironmentFile=" in text
    shared = ("ProtectSystem=strict", "ReadWritePaths=/var/lib/heygem-watch", "ProtectHome=yes", "PrivateTmp=yes",
              "NoNewPrivileges=yes", "CapabilityBoundingSet=", "SystemCallFilter=@system-service",
              "RestrictNamespaces=yes", "ProtectKernelModules=yes", "User=heygem", "IPAddressDeny=any")
    for needed in shared:
        assert needed in head and needed in text, needed
    assert "PrivateNetwork=yes" not in text and "AF_INET" in text and "IPAddressAllow=" in text  # the broker
    _verify_unit(exe, text, "heygem-watch-worker.service")


def test_worker_without_a_broker_url_is_a_config_error(in_tmp, capsys, env_clean):
    assert cli.main(["worker"]) == cli.EXIT_CONFIG
    assert "HEYGEM_BROKER_URL" in capsys.readouterr().err


def test_check_says_when_the_farm_broker_does_not_answer(in_tmp, monkeypatch, capsys):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HEYGEM_DISPATCH", "celery")
    monkeypatch.setenv("HEYGEM_BROKER_URL", f"redis://:hunter2@127.0.0.1:{port}/0")
    cli.main(["check"])
    out = capsys.readouterr().out
    assert f"PROBLEM  broker redis://:***@127.0.0.1:{port}/0" in out and "HEYGEM_BROKER_URL" in out, out
    assert "hunter2" not in out


def test_run_command_starts_and_stops_on_sigterm(in_tmp, face_template_file):
    """The real `heygem-watch run` entry point (default engine) on the defaults: starts, then stops on SIGTERM."""
    import signal

    (in_tmp / "var" / "templates").mkdir(parents=True)
    shutil.copy(face_template_file, in_tmp / "var" / "templates")
    exe = Path(sys.executable).parent / "heygem-watch"
    env = dict(os.environ, HEYGEM_LOG_FORMAT="json")
    p = subprocess.Popen([str(exe), "run"], cwd=in_tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if '"event": "ready"' in line:
                break
        assert any('"event": "ready"' in x for x in lines), "".join(lines)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=10)[0]
        assert p.returncode == 0 and time.monotonic() - t0 < 10
        assert '"event": "stopped"' in rest
    finally:
        if p.poll() is None:
            p.kill()


def test_process_with_the_real_builtin_engine(tmp_path, face_template_file):
    """The console script end to end, as a user runs it (fresh interpreter, default engine)."""
    rec = gen_media.write_av(tmp_path / "直播 'x'.flv", 1.0)
    exe = Path(sys.executable).parent / "heygem-watch"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_")}
    env["HEYGEM_MIN_FREE_MB"] = "0"
    r = subprocess.run([str(exe), "process", str(rec), "-t", str(face_template_file), "-t", str(face_template_file),
                        "--out-dir", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("OK   anchor.png")  # the same template twice = one output
    from heygem_watch.media import probe

    info = probe(tmp_path / "out" / "anchor.mp4")
    assert info.has_audio and abs(info.duration - 1.0) < 0.15
    assert not (tmp_path / "var" / "ledger.sqlite3").exists()


def test_process_names_what_it_could_not_write_and_clears_a_killed_runs_leftovers(in_tmp, monkeypatch, capsys,
                                                                                passthrough_engine,
                                                                                face_template_file):
    import errno

    from heygem_watch import engines, pipeline, template

    monkeypatch.setattr(engines, "create_engine", lambda name, model=None, **kw: passthrough_engine)
    monkeypatch.setenv("HEYGEM_CACHE_DIR", str(in_tmp / "cache"))
    rec = gen_media.write_av(in_tmp / "rec.flv", 0.4)
    tpl = str(shutil.copy(face_template_file, in_tmp / "face.png"))
    # a run killed during an analysis (its pid is gone) left a half-written entry: the next run removes it
    stale = in_tmp / "cache" / "templates" / "0123abcd.tmp999999999.1"
    stale.mkdir(parents=True)
    (stale / "frames.yuv").write_bytes(b"\0" * 1000)

    def full(*a, **k):  # the template cache's disk is full (a plain write names no file)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(template, "_analyse", full)
    assert cli.main(["process", str(rec), "-t", tpl, "--output", str(in_tmp / "a.mp4")]) == cli.EXIT_FAIL
    out = capsys.readouterr().out
    assert not stale.exists()
    assert "FAIL face.png" in out and "No space left on device" in out and str(in_tmp / "cache") in out

    def work_full(recording, work):  # the work folder is full while the audio is extracted: no traceback
        raise OSError(errno.ENOSPC, "No space left on device", str(work / "audio.m4a"))

    monkeypatch.setattr(pipeline.RecordingJob, "prepare", staticmethod(work_full))
    assert cli.main(["process", str(rec), "-t", tpl, "--output", str(in_tmp / "b.mp4")]) == cli.EXIT_FAIL
    out = capsys.readouterr().out
    assert out.startswith("FAIL rec.flv:") and "No space left on device" in out and "audio.m4a" in out
