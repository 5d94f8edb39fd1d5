"""Shared fixtures: settings rooted in tmp, a passthrough engine, a face template, a daemon driven by hand."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


DAEMON_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from heygem_watch.config import load_settings
from heygem_watch.daemon import Daemon
from heygem_watch.engines.base import Engine
from heygem_watch.logs import configure

class Pass(Engine):
    name = "pass"
    def render(self, template, state, speech, jobs):
        for j in jobs:
            if {delay}:
                time.sleep({delay})
            yield j.image

configure("json", "info")
raise SystemExit(Daemon(load_settings(None), engine=Pass()).run())
"""


def daemon_script(delay: float = 0.0) -> str:
    """`python -c` source of a real daemon (settings from its environment, JSON logs on stdout) whose engine hands
    template frames back unchanged, sleeping delay s before each."""
    return DAEMON_SCRIPT.format(root=str(ROOT), delay=float(delay))


def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    """True as soon as pred() is, False when timeout s pass first (polled every step s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def daemon_var(tmp_path: Path, template: Path, **env) -> tuple[Path, dict]:
    """A var/ under tmp_path with template in its template folder, and the environment for a daemon subprocess
    on it (no inherited HEYGEM_* or systemd socket; 0.2 s settle, no disk minimum, JSON logs). env adds keys."""
    import shutil

    var = tmp_path / "var"
    (var / "templates").mkdir(parents=True)
    shutil.copy(template, var / "templates")
    out = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_") and k != "NOTIFY_SOCKET"}
    out.update(HEYGEM_VAR_DIR=str(var), HEYGEM_SETTLE_SECONDS="0.2", HEYGEM_MIN_FREE_MB="0",
               HEYGEM_X264_PRESET="ultrafast", HEYGEM_LOG_FORMAT="json", **env)
    return var, out


WEB_START_TIMEOUT_S = 60


@contextlib.contextmanager
def dashboard(tmp_path: Path, var: Path, **env_extra: str):
    """`heygem-watch web` alone on var/ (no daemon, JSON logs), stdout and stderr in tmp_path/web.log; yields its
    URL once it answers. env_extra: more HEYGEM_* settings."""
    from tests.redisd import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_")}
    env.update(PYTHONPATH=str(ROOT), HEYGEM_VAR_DIR=str(var), HEYGEM_LOG_FORMAT="json", **env_extra)
    with open(tmp_path / "web.log", "wb") as log:
        web = subprocess.Popen([sys.executable, "-m", "heygem_watch", "web", "--port", str(port)], cwd=tmp_path,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + WEB_START_TIMEOUT_S
            while True:
                try:
                    urllib.request.urlopen(url + "/api/config", timeout=1).read()
                    break
                except OSError:
                    assert web.poll() is None and time.monotonic() < deadline, (tmp_path / "web.log").read_text()
                    time.sleep(0.2)
            yield url
        finally:
            web.terminate()
            web.wait(20)


def make_settings(root: Path, **env):
    """Settings for a var/ under root: no settle wait, no disk minimum, JSON logs. env overrides HEYGEM_* keys."""
    from heygem_watch.config import load_settings

    base = {"HEYGEM_VAR_DIR": str(root / "var"), "HEYGEM_SETTLE_SECONDS": "0", "HEYGEM_MIN_FREE_MB": "0",
            "HEYGEM_LOG_FORMAT": "json", "HEYGEM_X264_PRESET": "ultrafast"}
    base.update({k: str(v) for k, v in env.items()})
    return load_settings(None, environ=base, cwd=root, isatty=False)


@pytest.fixture
def settings_factory(tmp_path):
    return lambda **env: make_settings(tmp_path, **env)


@pytest.fixture
def no_speech_detector(monkeypatch):
    """As if silero-vad were not installed (an update without ./setup.sh): the real lookup fails with its real
    message, and the detector this process already loaded is forgotten for the test."""
    import importlib.metadata

    from heygem_watch import vad

    real = importlib.metadata.distribution

    def distribution(name):
        if name == vad.DIST:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    vad.load_detector.cache_clear()
    yield
    vad.load_detector.cache_clear()


@pytest.fixture
def passthrough_engine():
    from heygem_watch.engines.base import Engine

    class Passthrough(Engine):
        """Returns template frames unchanged: daemon tests are about filing, not lip-sync."""

        name = "passthrough"

        def render(self, template, state, speech, jobs):
            for j in jobs:
                yield j.image

    return Passthrough()


@pytest.fixture(scope="session")
def face_template_file(tmp_path_factory) -> Path:
    from tests import gen_media

    return gen_media.face_png(tmp_path_factory.mktemp("tpl") / "anchor.png")


@pytest.fixture(scope="session")
def faceless_template_file(tmp_path_factory) -> Path:
    from tests import gen_media

    return gen_media.faceless_png(tmp_path_factory.mktemp("tpl") / "wall.png")


@pytest.fixture
def daemon_factory(tmp_path, passthrough_engine, face_template_file):
    """Daemon(settings, passthrough engine) with one face template installed; not started (tests drive it)."""
    import shutil

    from heygem_watch.daemon import Daemon
    from heygem_watch.logs import configure

    made = []

    def make(templates=(face_template_file,), engine=passthrough_engine, **env):
        s = make_settings(tmp_path, **env)
        s.template_dir.mkdir(parents=True, exist_ok=True)
        for t in templates:
            shutil.copy(t, s.template_dir / Path(t).name)
        configure("json", "info")
        d = Daemon(s, engine=engine)
        made.append(d)
        return d

    yield make
    for d in made:
        d.watcher.stop()
        d.ledger.close()


def drain(daemon, limit: int = 1000) -> int:
    """Run queued tasks until none is left; returns how many ran."""
    n = 0
    while n < limit and daemon.run_one() is not None:
        n += 1
    return n


@pytest.fixture
def env_clean(monkeypatch):
    """No HEYGEM_* from the outer environment leaks into a test."""
    for k in list(os.environ):
        if k.startswith("HEYGEM_") or k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.fixture(autouse=True)
def _logging_follows_the_current_stdout():
    """A test that configures logging (cli.main under capsys) binds structlog to its captured stdout, closed after
    that test; the next get_logger() must configure again against whatever stdout is current then."""
    yield
    from heygem_watch import logs

    logs._configured = False


@pytest.fixture(scope="module")
def photo():
    """(the synthetic face photo, its 478 FaceMesh landmarks as float64 pixels) for the builtin engine's tests."""
    import numpy as np

    from heygem_watch import face
    from tests import mediagen

    img = mediagen.face_photo()
    with face.FaceMesh(static_image=True) as mesh:
        lm = mesh.detect(img)
    assert lm is not None
    return img, lm.astype(np.float64)
