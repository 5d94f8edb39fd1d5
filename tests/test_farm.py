"""Render farm end to end: a real redis-server, a real head (`heygem-watch run`, HEYGEM_DISPATCH=celery) and real
`heygem-watch worker` processes, the built-in engine, tiny generated media. Nothing lost, nothing twice."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heygem_watch.ledger import Ledger
from tests import gen_media
from tests.redisd import RedisServer

ROOT = Path(__file__).resolve().parents[1]
VISIBILITY_S = 6  # the broker's redelivery delay after a worker dies (production: longer than the longest render)
RECORDING_S = 6.0  # 150 frames at 25 fps: long enough to be killed mid-render, short enough to keep the test fast
DONE_TIMEOUT_S = 180


def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


class Farm:
    """redis + head + workers as subprocesses (own process groups, so kill -9 takes a worker's pool with it)."""

    def __init__(self, root: Path, redis: RedisServer):
        self.root, self.redis = root, redis
        self.var = root / "var"
        (self.var / "templates").mkdir(parents=True)
        (self.var / "incoming").mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, list[Path]] = {}  # every run of a process name (a restarted head keeps its old log)

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_")}
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   HEYGEM_VAR_DIR=str(self.var), HEYGEM_BROKER_URL=self.redis.url, HEYGEM_SETTLE_SECONDS="0.3",
                   HEYGEM_MIN_FREE_MB="0", HEYGEM_X264_PRESET="ultrafast", HEYGEM_LOG_FORMAT="json",
                   HEYGEM_VISIBILITY_TIMEOUT=str(VISIBILITY_S), HEYGEM_ENGINE="builtin", PYTHONUNBUFFERED="1")
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
        assert wait_for(lambda: '"event": "ready"' in self.last_log("head") or p.poll() is not None, 60), \
            self.log("head")
        assert p.poll() is None, self.log("head")
        return p

    def worker(self, name: str) -> subprocess.Popen:
        cache = self.root / f"cache-{name}"  # each worker's own template cache, off the shared var/
        p = self._start(name, ["worker", "--name", name], self.env(HEYGEM_CACHE_DIR=str(cache)))
        assert wait_for(lambda: "ready." in self.last_log(name) or p.poll() is not None, 60), self.log(name)
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


@pytest.fixture
def farm(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    f = Farm(tmp_path, redis)
    yield f
    f.close()


def add_templates(farm: Farm, names=("anna.png", "ben.png")) -> list[str]:
    for k, n in enumerate(names):
        gen_media.face_png(farm.var / "templates" / n, size=(240 - 40 * k, 288 - 48 * k))
    return list(names)


def drop(farm: Farm, name: str, seed: int, seconds: float = RECORDING_S) -> None:
    """Written beside incoming/ and moved in, as a finished recording arrives (distinct content per seed)."""
    src = farm.root / name
    gen_media.write_av(src, seconds, audio=gen_media.speech(seconds, seed=seed))
    shutil.move(src, farm.var / "incoming" / name)


def outputs(farm: Farm) -> list[Path]:
    return sorted((farm.var / "outputs").rglob("*.mp4"))


def all_finished(farm: Farm, n: int) -> bool:
    ts = farm.tasks()
    return len(ts) == n and all(t.state in ("done", "failed") for t in ts)


def deliveries(farm: Farm, celery_id: str) -> int:
    return int(farm.redis.client().get(f"heygem:deliveries:{celery_id}") or 0)


def test_two_workers_render_every_task_once_and_a_killed_workers_task_is_redelivered(farm):
    add_templates(farm)
    farm.worker("w1")
    farm.worker("w2")
    farm.head()
    for i in range(6):
        drop(farm, f"show {i}.flv", seed=i)
    # once w1 has rendered something, kill -9 it (its pool process too) while it holds a task with a partial
    # output on disk
    assert wait_for(lambda: any(t.state == "done" and (t.worker or "").startswith("w1@") for t in farm.tasks()),
                    90, 0.1), farm.debug()
    victim: list[str] = []

    def w1_mid_render() -> bool:
        r = farm.redis.client()
        for key in r.scan_iter("heygem:lease:*"):
            owner = (r.get(key) or b"").decode()
            cid = key.decode().rsplit(":", 1)[1]
            partial = list((farm.var / "tmp" / "farm" / cid).glob(".partial-*"))
            if owner.startswith("w1@") and partial and partial[0].stat().st_size > 0:
                farm.kill9("w1")
                victim.append(cid)
                return True
        return False

    assert wait_for(w1_mid_render, 90, 0.01), farm.debug()
    killed = next(t for t in farm.tasks() if t.celery_id == victim[0])
    assert not Path(killed.output_path or "/nonexistent").exists()
    assert wait_for(lambda: all_finished(farm, 12), DONE_TIMEOUT_S, 0.2), farm.debug()

    tasks = farm.tasks()
    assert [t.state for t in tasks] == ["done"] * 12, [(t.id, t.state, t.error) for t in tasks]
    outs = outputs(farm)
    assert len(outs) == 12 and len({o.resolve() for o in outs}) == 12
    assert sorted(Path(t.output_path) for t in tasks) == outs  # each task's own file, nothing else
    assert {o.name for o in outs} == {"anna.mp4", "ben.mp4"} and len({o.parent for o in outs}) == 6
    assert not list(farm.var.rglob(".partial-*")), list(farm.var.rglob(".partial-*"))
    # the ledger says who rendered what; the killed task was finished by the other worker, on its 2nd delivery
    workers = {t.worker.split("@")[0] for t in tasks}
    assert workers == {"w1", "w2"}, workers
    redone = next(t for t in tasks if t.celery_id == victim[0])
    assert redone.worker.startswith("w2@") and redone.attempts == 2 and deliveries(farm, victim[0]) == 2
    assert all(deliveries(farm, t.celery_id) == 1 for t in tasks if t.celery_id != victim[0])
    for t in tasks:
        assert t.timings["worker"] == t.worker and t.timings["celery_id"] == t.celery_id
    # each recording filed once, as in local mode
    assert len(list((farm.var / "archive").rglob("*.flv"))) == 6
    assert len(list((farm.var / "outputs").rglob("manifest.json"))) == 6
    st = subprocess.run([sys.executable, "-m", "heygem_watch", "status"], cwd=farm.root, env=farm.env(),
                        capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    assert "workers: 2" in st.stdout and "w2@" in st.stdout and "done 12" in st.stdout, st.stdout


def test_redis_outage_and_head_restart_lose_nothing_and_do_nothing_twice(farm):
    add_templates(farm)
    farm.worker("w1")
    farm.worker("w2")
    farm.head()
    for i in range(4):
        drop(farm, f"a{i}.flv", seed=10 + i)
    assert wait_for(lambda: sum(t.state == "done" for t in farm.tasks()) >= 2, 120, 0.02), farm.debug()
    farm.redis.stop()  # mid-run: workers are rendering, the rest waits in Redis
    t_down = time.monotonic()
    for i in range(2):  # the head keeps taking recordings in while the broker is down
        drop(farm, f"b{i}.flv", seed=20 + i)
    assert wait_for(lambda: len(farm.tasks()) == 12, 30), farm.debug()
    waiting = [t for t in farm.tasks() if t.recording_id > 4]
    assert all(t.dispatched_at is None and t.state == "queued" for t in waiting), waiting  # taken in, not sent
    time.sleep(max(0.0, 20 - (time.monotonic() - t_down)))
    farm.redis.start()
    # the head sends what it took in meanwhile; kill -9 it while tasks are in flight, then start it again
    assert wait_for(lambda: all(t.dispatched_at for t in farm.tasks()), 60, 0.02), farm.debug()
    before = {t.id: t.celery_id for t in farm.tasks()}
    assert any(t.state in ("queued", "running") for t in farm.tasks())
    farm.kill9("head")
    farm.head()
    assert wait_for(lambda: all_finished(farm, 12), DONE_TIMEOUT_S, 0.2), farm.debug()

    tasks = farm.tasks()
    assert [t.state for t in tasks] == ["done"] * 12, [(t.id, t.state, t.error) for t in tasks]
    assert {t.id: t.celery_id for t in tasks} == before  # re-attached by Celery id, nothing sent anew
    assert '"farm_reattached"' in farm.log("head")
    assert {t.id: deliveries(farm, t.celery_id) for t in tasks} == {t.id: 1 for t in tasks}  # rendered once
    outs = outputs(farm)
    assert len(outs) == 12 and sorted(Path(t.output_path) for t in tasks) == outs
    assert not list(farm.var.rglob(".partial-*"))
    assert '"broker_unavailable"' in farm.log("head")

    # a task that fails on three deliveries ends failed with the reason: with no worker running, a recording is
    # sent, then one of its templates disappears from the shared var/ before a (new) worker gets to it
    farm.kill9("w1")
    farm.kill9("w2")
    drop(farm, "c.flv", seed=30, seconds=1.0)
    assert wait_for(lambda: len(farm.tasks()) == 14 and all(t.dispatched_at for t in farm.tasks()), 60), farm.debug()
    (farm.var / "templates" / "anna.png").unlink()
    farm.worker("w3")
    assert wait_for(lambda: all_finished(farm, 14), 120, 0.2), farm.debug()
    bad, good = farm.tasks()[-2:]
    assert bad.state == "failed" and bad.attempts == 3, (bad.state, bad.attempts, bad.error)
    assert "failed on 3 deliveries" in bad.error and "anna.png" in bad.error, bad.error
    assert deliveries(farm, bad.celery_id) == 3
    assert good.state == "done" and good.worker.startswith("w3@")
    with Ledger(farm.var / "ledger.sqlite3") as led:
        assert led.recording(bad.recording_id).state == "partial"
