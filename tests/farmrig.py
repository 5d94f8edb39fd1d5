"""The render farm as processes, for tests/test_farm.py and bench/farm.py: a real redis-server (tests/redisd.py),
a head (`heygem-watch run`, HEYGEM_DISPATCH=celery) and `heygem-watch worker`s, each in its own process group."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from heygem_watch.ledger import Ledger
from tests import gen_media
from tests.conftest import wait_for  # noqa: F401 - test_farm imports it from here
from tests.redisd import RedisServer

ROOT = Path(__file__).resolve().parents[1]
VISIBILITY_S = 6  # the broker's redelivery delay after a worker dies (production: longer than the longest render)
RECORDING_S = 6.0  # 150 frames at 25 fps: long enough to be killed mid-render, short enough to keep tests fast


class Farm:
    """redis + head + workers as subprocesses (own process groups, so kill -9 takes a worker's pool with it)."""

    def __init__(self, root: Path, redis: RedisServer, visibility_s: float = VISIBILITY_S):
        self.root, self.redis, self.visibility_s = root, redis, visibility_s
        self.var = root / "var"
        (self.var / "templates").mkdir(parents=True)
        (self.var / "incoming").mkdir(parents=True)
        # the processes' temporary files (billiard's pymp-* folders, which a worker killed with -9 leaves behind)
        # stay under the test's own folder, not in the machine's /tmp
        (root / "tmp").mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, list[Path]] = {}  # every run of a process name (a restarted head keeps its old log)

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_")}
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   HEYGEM_VAR_DIR=str(self.var), HEYGEM_BROKER_URL=self.redis.url, HEYGEM_SETTLE_SECONDS="0.3",
                   HEYGEM_MIN_FREE_MB="0", HEYGEM_X264_PRESET="ultrafast", HEYGEM_LOG_FORMAT="json",
                   HEYGEM_VISIBILITY_TIMEOUT=str(self.visibility_s), HEYGEM_ENGINE="builtin", PYTHONUNBUFFERED="1",
                   TMPDIR=str(self.root / "tmp"))
        env.update(extra)
        return env

    def _start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = self.root / f"{name}-{time.monotonic_ns()}.log"
        self.logs.setdefault(name, []).append(log)
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, "-m", "heygem_watch", *args], cwd=self.root, env=env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def head(self) -> subprocess.Popen:
        p = self._start("head", ["run"], self.env(HEYGEM_DISPATCH="celery"))
        assert wait_for(lambda: '"event": "ready"' in self.last_log("head") or p.poll() is not None, 180), \
            self.log("head")
        assert p.poll() is None, self.log("head")
        return p

    def worker(self, name: str) -> subprocess.Popen:
        cache = self.root / f"cache-{name}"  # each worker's own template cache, off the shared var/
        p = self._start(name, ["worker", "--name", name], self.env(HEYGEM_CACHE_DIR=str(cache)))
        assert wait_for(lambda: "ready." in self.last_log(name) or p.poll() is not None, 180), self.log(name)
        assert p.poll() is None, self.log(name)
        return p

    def kill9(self, name: str) -> None:
        p = self.procs[name]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)

    def log(self, name: str) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs.get(name, []))

    def last_log(self, name: str) -> str:
        return self.logs[name][-1].read_text(errors="replace")

    def tasks(self):
        with Ledger(self.var / "ledger.sqlite3") as led:
            return [t for r in reversed(led.recent_recordings(1000)) for t in led.tasks_for(r.id)]

    def close(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        self.redis.stop()

    def debug(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.logs)


def add_templates(farm: Farm, names=("anna.png", "ben.png")) -> list[str]:
    for k, n in enumerate(names):
        gen_media.face_png(farm.var / "templates" / n, size=(240 - 40 * k, 288 - 48 * k))
    return list(names)


def drop(farm: Farm, name: str, seed: int, seconds: float = RECORDING_S) -> None:
    """Written beside incoming/ and moved in, as a finished recording arrives (distinct content per seed)."""
    src = farm.root / name
    gen_media.write_av(src, seconds, audio=gen_media.speech(seconds, seed=seed))
    shutil.move(src, farm.var / "incoming" / name)
