"""Render farm end to end: a real redis-server, a real head (`heygem-watch run`, HEYGEM_DISPATCH=celery) and real
`heygem-watch worker` processes, the built-in engine, tiny generated media. Nothing lost, nothing twice."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heygem_watch.ledger import Ledger
from tests.farmrig import Farm, add_templates, drop, wait_for
from tests.redisd import RedisServer

TLS_FRAMES = 4000  # at 25 fps
DONE_TIMEOUT_S = 600  # generous: a loaded machine must not fail the test; it ends as soon as all are done


@pytest.fixture
def farm(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    f = Farm(tmp_path, redis)
    yield f
    f.close()


def outputs(farm: Farm) -> list[Path]:
    return sorted((farm.var / "outputs").rglob("*.mp4"))


def all_finished(farm: Farm, n: int) -> bool:
    ts = farm.tasks()
    return len(ts) == n and all(t.state in ("done", "failed") for t in ts)


def deliveries(farm: Farm, celery_id: str) -> int:
    return int(farm.redis.client().get(f"heygem:deliveries:{celery_id}") or 0)


def test_two_workers_render_every_task_once_and_a_killed_workers_task_is_redelivered(farm):
    # a production-like visibility timeout: Redis alone would give the killed worker's task back only after an
    # hour; the head sees the worker gone (no heartbeat, lease lapsed) and sends the task again itself
    farm.visibility_s = 3600
    add_templates(farm)
    farm.worker("w1")
    farm.worker("w2")
    farm.head()
    for i in range(6):
        drop(farm, f"show {i}.flv", seed=i)
    # once w1 has rendered something, kill -9 it (its pool process too) while it holds a task with a partial
    # output on disk
    assert wait_for(lambda: any(t.state == "done" and (t.worker or "").startswith("w1@") for t in farm.tasks()),
                    300, 0.1), farm.debug()
    victim: list[str] = []

    def w1_mid_render() -> bool:
        r = farm.redis.client()
        for key in r.scan_iter("heygem:lease:*"):
            owner = (r.get(key) or b"").decode()
            cid = key.decode().rsplit(":", 1)[1]
            try:  # polled every 10 ms: a task may finish, and its work folder go, between listing and reading
                partial = list((farm.var / "tmp" / "farm" / cid).glob(".partial-*"))
                started = bool(partial) and partial[0].stat().st_size > 0
            except FileNotFoundError:
                continue
            if owner.startswith("w1@") and started:
                farm.kill9("w1")
                victim.append(cid)
                return True
        return False

    assert wait_for(w1_mid_render, 300, 0.01), farm.debug()
    t_kill = time.monotonic()
    killed = next(t for t in farm.tasks() if t.celery_id == victim[0])
    assert not Path(killed.output_path or "/nonexistent").exists()
    assert wait_for(lambda: next(t for t in farm.tasks() if t.celery_id == victim[0]).state == "done",
                    DONE_TIMEOUT_S, 0.2), farm.debug()
    print(f"killed worker's task done by the other one {time.monotonic() - t_kill:.1f} s after the kill")
    # ...while the killed worker's own copy of the message is still unacknowledged in Redis (the visibility timeout
    # is an hour away): the head's re-send did it, not the broker
    assert any(victim[0].encode() in v for v in farm.redis.client().hvals("unacked"))
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
    assert '"worker_lost"' in farm.log("head") and victim[0] in farm.log("head")
    assert all(deliveries(farm, t.celery_id) == 1 for t in tasks if t.celery_id != victim[0])
    done_events = [json.loads(line)["task_id"] for line in farm.log("head").splitlines() if '"task_done"' in line]
    assert sorted(done_events) == sorted(t.id for t in tasks), done_events  # each filed once
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
    assert wait_for(lambda: sum(t.state == "done" for t in farm.tasks()) >= 2, 300, 0.02), farm.debug()
    farm.redis.stop()  # mid-run: workers are rendering, the rest waits in Redis
    t_down = time.monotonic()
    for i in range(2):  # the head keeps taking recordings in while the broker is down
        drop(farm, f"b{i}.flv", seed=20 + i)
    assert wait_for(lambda: len(farm.tasks()) == 12, 120), farm.debug()
    waiting = [t for t in farm.tasks() if t.recording_id > 4]
    assert all(t.dispatched_at is None and t.state == "queued" for t in waiting), waiting  # taken in, not sent
    time.sleep(max(0.0, 20 - (time.monotonic() - t_down)))
    farm.redis.start()
    # the head sends what it took in meanwhile; kill -9 it while tasks are in flight, then start it again
    assert wait_for(lambda: all(t.dispatched_at for t in farm.tasks()), 300, 0.02), farm.debug()
    before = {t.id: t.celery_id for t in farm.tasks()}
    assert any(t.state in ("queued", "running") for t in farm.tasks())
    farm.kill9("head")
    farm.head()
    assert wait_for(lambda: all_finished(farm, 12), DONE_TIMEOUT_S, 0.2), farm.debug()

    tasks = farm.tasks()
    assert [t.state for t in tasks] == ["done"] * 12, [(t.id, t.state, t.error) for t in tasks]
    assert {t.id: t.celery_id for t in tasks} == before  # re-attached by Celery id, nothing sent anew
    assert '"farm_reattached"' in farm.log("head")
    # finished once each: one task_done per task in the head's logs (both runs). A render still running when Redis
    # came back could be delivered a second time here (the test's visibility timeout, 6 s, is shorter than the
    # outage); the lease and the existing output keep that from rendering twice side by side or filing twice.
    done_events = [json.loads(line)["task_id"] for line in farm.log("head").splitlines() if '"task_done"' in line]
    assert sorted(done_events) == sorted(t.id for t in tasks), done_events
    print("deliveries per task:", {t.id: deliveries(farm, t.celery_id) for t in tasks})
    assert all(1 <= deliveries(farm, t.celery_id) <= 2 for t in tasks)
    outs = outputs(farm)
    assert len(outs) == 12 and sorted(Path(t.output_path) for t in tasks) == outs
    assert not list(farm.var.rglob(".partial-*"))
    assert '"broker_unavailable"' in farm.log("head")

    # a task that fails on three deliveries ends failed with the reason: with no worker running, a recording is
    # sent, then one of its templates disappears from the shared var/ before a (new) worker gets to it
    farm.kill9("w1")
    farm.kill9("w2")
    drop(farm, "c.flv", seed=30, seconds=1.0)
    assert wait_for(lambda: len(farm.tasks()) == 14 and all(t.dispatched_at for t in farm.tasks()), 300), \
        farm.debug()
    (farm.var / "templates" / "anna.png").unlink()
    farm.worker("w3")
    assert wait_for(lambda: all_finished(farm, 14), DONE_TIMEOUT_S, 0.2), farm.debug()
    bad, good = farm.tasks()[-2:]
    assert bad.state == "failed" and bad.attempts == 3, (bad.state, bad.attempts, bad.error)
    assert "failed on 3 deliveries" in bad.error and "anna.png" in bad.error, bad.error
    assert deliveries(farm, bad.celery_id) == 3
    assert good.state == "done" and good.worker.startswith("w3@")
    with Ledger(farm.var / "ledger.sqlite3") as led:
        assert led.recording(bad.recording_id).state == "partial"


def test_head_and_worker_over_tls_with_a_password(tmp_path):
    """rediss:// as docs/farm.md sets it up: Redis on a TLS port only, a password, the server certificate checked
    against a CA; a recording goes head -> worker -> output over it, its progress (frames, fps, ETA) reaching the
    head's ledger while it renders. A client without that CA is refused."""
    import redis as redis_py

    server = RedisServer(tmp_path / "redis", tls=True).start()
    farm = Farm(tmp_path, server)
    try:
        add_templates(farm, ("anna.png",))
        farm.worker("w1")
        farm.head()
        # progress reaches the head at most every 2 s (pipeline) + 1 s (worker report): a render of several such
        # periods leaves it in the ledger long enough to be seen (1000 frames took 2.6 s on an idle core: missed)
        drop(farm, "tls.flv", seed=40, seconds=TLS_FRAMES / 25)
        seen = []

        def progress_in_ledger() -> bool:  # frames, fps and ETA of the remote render, as the head wrote them
            t = farm.tasks()[0] if farm.tasks() else None
            if t is not None and t.state == "running" and 0 < t.progress_done < t.progress_total:
                seen.append((t.worker, t.progress_done, t.progress_total, t.fps, t.eta_s))
            return bool(seen) or (t is not None and t.state in ("done", "failed"))

        assert wait_for(progress_in_ledger, DONE_TIMEOUT_S, 0.05), farm.debug()
        assert seen, "no progress seen while it rendered"
        worker, done, total, fps, eta = seen[0]
        assert worker.startswith("w1@") and total == TLS_FRAMES and fps > 0 and eta is not None and eta >= 0, seen
        assert wait_for(lambda: all_finished(farm, 1), DONE_TIMEOUT_S, 0.2), farm.debug()
        t = farm.tasks()[0]
        assert t.state == "done" and t.worker.startswith("w1@") and Path(t.output_path).is_file()
        assert "farm-test-secret" not in farm.log("head") + farm.log("w1")  # the password is never logged
        with pytest.raises(redis_py.ConnectionError, match="certificate verify failed"):
            redis_py.Redis(port=server.port, password=server.password, ssl=True, socket_connect_timeout=2).ping()
    finally:
        farm.close()


def test_a_worker_stopped_with_sigterm_finishes_its_render_and_leaves(farm):
    """Removing a worker (`systemctl stop`: SIGTERM to its main process, KillMode=mixed; Celery's warm shutdown)
    mid-render: its render is finished and filed by it, once; it exits; the other worker renders the rest."""
    add_templates(farm)
    farm.worker("w1")
    farm.worker("w2")
    farm.head()
    for i in range(2):
        drop(farm, f"stop {i}.flv", seed=50 + i)
    held: list[str] = []

    def w1_rendering() -> bool:
        r = farm.redis.client()
        for key in r.scan_iter("heygem:lease:*"):
            cid = key.decode().rsplit(":", 1)[1]
            if (r.get(key) or b"").decode().startswith("w1@") and \
                    list((farm.var / "tmp" / "farm" / cid).glob(".partial-*")):
                farm.procs["w1"].send_signal(signal.SIGTERM)  # the main process only, as KillMode=mixed does
                held.append(cid)
                return True
        return False

    assert wait_for(w1_rendering, 300, 0.01), farm.debug()
    assert farm.procs["w1"].wait(120) == 0, farm.log("w1")[-3000:]
    assert wait_for(lambda: all_finished(farm, 4), DONE_TIMEOUT_S, 0.2), farm.debug()
    tasks = farm.tasks()
    assert [t.state for t in tasks] == ["done"] * 4
    mine = next(t for t in tasks if t.celery_id == held[0])
    assert mine.worker.startswith("w1@") and mine.attempts == 1 and deliveries(farm, held[0]) == 1
    assert all(deliveries(farm, t.celery_id) == 1 for t in tasks)
    assert len(outputs(farm)) == 4 and not list(farm.var.rglob(".partial-*"))
