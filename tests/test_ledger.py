"""ledger.py: arrival order, duplicates, crash recovery, progress, and two processes writing at once."""
import hashlib
import multiprocessing as mp
from pathlib import Path

import pytest

from heygem_watch.ledger import MAX_ATTEMPTS, Ledger, fingerprint_file

TPLS = [("/t/a.mp4", "fa"), ("/t/b.png", "fb")]


@pytest.fixture
def led(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite3") as l:
        yield l


def add(led, name, fp, **kw):
    return led.add_recording(Path("/in") / name, fp, 100, TPLS, output_dir=Path("/out") / name, **kw)


def test_fingerprint_is_content_hash(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    data = bytes(range(256)) * 10000
    a.write_bytes(data)
    b.write_bytes(data)
    c.write_bytes(data[:-1] + b"x")
    assert fingerprint_file(a) == fingerprint_file(b) == hashlib.blake2b(data, digest_size=20).hexdigest()
    assert fingerprint_file(c) != fingerprint_file(a)


def test_wal_mode(led):
    assert led._query("PRAGMA journal_mode")[0][0] == "wal"


def test_tasks_claimed_in_arrival_order(led):
    r1, r2 = add(led, "one.flv", "f1"), add(led, "two.flv", "f2")
    assert r1.duplicate_of is None and len(r1.task_ids) == 2
    claimed = []
    while (t := led.claim_next_task()) is not None:
        assert t.state == "running" and t.attempts == 1 and t.started_at
        claimed.append(t.id)
        led.finish_task(t.id, f"/out/{t.id}.mp4", {"wall_s": 1.0})
    assert claimed == r1.task_ids + r2.task_ids
    assert led.counts() == {"queued": 0, "running": 0, "done": 4, "failed": 0}
    assert led.task(claimed[0]).timings == {"wall_s": 1.0}
    assert led.recording(r1.recording_id).state == "running"  # the daemon files it, not the ledger


def test_duplicate_content_not_queued_twice(led):
    r1 = add(led, "a.flv", "same")
    r2 = add(led, "copy of a.flv", "same", source="web")
    assert r2.duplicate_of == r1.recording_id and r2.task_ids == []
    assert len(led.tasks_for(r1.recording_id)) == 2
    ev = led.events("duplicate")
    assert ev and ev[0]["detail"]["path"].endswith("copy of a.flv") and ev[0]["recording_id"] == r1.recording_id
    assert led.find_by_fingerprint("same").id == r1.recording_id
    assert led.find_by_fingerprint("other") is None


def test_failed_recording_may_be_dropped_again(led):
    r1 = add(led, "a.flv", "fp")
    led.set_recording_state(r1.recording_id, "failed", error="no templates worked")
    r2 = add(led, "a.flv", "fp")
    assert r2.duplicate_of is None and r2.recording_id != r1.recording_id
    assert led.find_by_fingerprint("fp").id == r2.recording_id


def test_progress_queue_position_and_failure(led):
    r = add(led, "a.flv", "f1")
    add(led, "b.flv", "f2")
    t = led.claim_next_task()
    assert led.queue_position(t.id) == 0 and led.queue_position(r.task_ids[1]) == 1
    led.update_progress(t.id, 50, 200, 24.5, 6.1)
    rt = led.running_tasks()
    assert [x.id for x in rt] == [t.id] and (rt[0].progress_done, rt[0].progress_total, rt[0].fps) == (50, 200, 24.5)
    led.fail_task(t.id, "boom")
    assert led.task(t.id).state == "failed" and led.task(t.id).error == "boom"
    assert led.fail_queued_for(r.recording_id, "unusable") == 1
    assert [x.state for x in led.tasks_for(r.recording_id)] == ["failed", "failed"]


def test_requeue_running_after_crash_and_give_up_after_max_attempts(tmp_path):
    db = tmp_path / "l.sqlite3"
    led = Ledger(db)
    r = add(led, "a.flv", "f1")
    t = led.claim_next_task()
    led.close()  # "kill -9": the task stays running in the file
    led = Ledger(db)
    assert led.requeue_running() == 1
    assert led.task(t.id).state == "queued"
    assert led.claim_next_task().id == t.id  # keeps its place in the queue
    while led.task(t.id).attempts < MAX_ATTEMPTS:
        assert led.requeue_running() == 1
        assert led.claim_next_task().id == t.id
    assert led.task(t.id).attempts == MAX_ATTEMPTS
    assert led.requeue_running() == 0
    assert led.task(t.id).state == "failed" and "interrupted" in led.task(t.id).error
    assert led.task(r.task_ids[1]).state == "queued"
    led.close()


def test_requeue_task_and_recent(led):
    r = add(led, "a.flv", "f1", batch="b1")
    t = led.claim_next_task()
    led.requeue_task(t.id)
    assert led.task(t.id).state == "queued" and led.queue_position(t.id) == 1
    assert [x.id for x in led.recordings_in_batch("b1")] == [r.recording_id]
    assert led.recent_recordings(5)[0].name == "a.flv"
    led.set_recording_state(r.recording_id, "done", final_path="/archive/a.flv")
    rec = led.recording(r.recording_id)
    assert rec.state == "done" and rec.final_path == "/archive/a.flv" and rec.finished_at
    with pytest.raises(ValueError):
        led.set_recording_state(r.recording_id, "exploded")


def _writer(db: str, prefix: str, n: int) -> None:
    with Ledger(db) as l:
        for i in range(n):
            l.add_recording(f"/in/{prefix}{i}.flv", f"{prefix}{i}", 1, [("/t/a.mp4", "fa")],
                            output_dir=f"/out/{prefix}{i}", source="web")


def test_two_processes_write_while_one_claims(tmp_path):
    db = str(tmp_path / "l.sqlite3")
    Ledger(db).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, p, 40)) for p in ("x", "y")]
    for p in procs:
        p.start()
    claimed = []
    with Ledger(db) as led:
        while any(p.is_alive() for p in procs) or led.counts()["queued"]:
            t = led.claim_next_task()
            if t is not None:
                claimed.append(t.id)
                led.finish_task(t.id, "/o.mp4", {})
        for p in procs:
            p.join()
            assert p.exitcode == 0
        while (t := led.claim_next_task()) is not None:
            claimed.append(t.id)
        assert len(claimed) == len(set(claimed)) == 80
        assert led.recording_counts()["queued"] + led.recording_counts()["running"] == 80


def test_requeued_recording_reads_as_queued_again(led):
    r = add(led, "a.flv", "f1")
    t = led.claim_next_task()
    assert led.recording(r.recording_id).state == "running"
    led.requeue_task(t.id)
    assert led.recording(r.recording_id).state == "queued"
    t = led.claim_next_task()
    led.finish_task(t.id, "/o.mp4", {})
    t2 = led.claim_next_task()
    led.requeue_task(t2.id)
    assert led.recording(r.recording_id).state == "running"  # one template is already done


def test_renderer_heartbeat_running_stale_and_stopped(led, monkeypatch):
    """No heartbeat yet: not running (never seen). A fresh beat: running. A beat older than the limit, or a clean
    stop: not running, since the last sign of life."""
    import heygem_watch.ledger as L

    st = led.renderer_status()
    assert st["running"] is False and st["since"] is None and "never" in st["message"]
    t0 = 1_800_000_000.0
    monkeypatch.setattr(L.time, "time", lambda: t0)
    led.beat()
    st = led.renderer_status()
    assert st["running"] is True and st["pid"] > 0 and st["last_beat"] == t0
    monkeypatch.setattr(L.time, "time", lambda: t0 + L.HEARTBEAT_STALE_S + 1)
    st = led.renderer_status()
    assert st["running"] is False and st["since"] == t0 and "not running since" in st["message"]
    led.beat()
    assert led.renderer_status()["running"] is True
    monkeypatch.setattr(L.time, "time", lambda: t0 + L.HEARTBEAT_STALE_S + 5)
    led.beat_stopped()
    st = led.renderer_status()
    assert st["running"] is False and st["since"] == t0 + L.HEARTBEAT_STALE_S + 5


def test_a_ledger_from_before_the_farm_gains_its_columns(tmp_path):
    import sqlite3

    from heygem_watch.ledger import Ledger

    db = tmp_path / "old.sqlite3"
    with Ledger(db) as led:
        led.add_recording(tmp_path / "a.flv", "fp", 1, [("t.png", "tfp")], output_dir=tmp_path / "out")
    con = sqlite3.connect(db)
    con.execute("DROP INDEX tasks_celery")  # the schema as it was before: no farm columns
    for name in ("celery_id", "dispatched_at", "worker"):
        con.execute(f"ALTER TABLE tasks DROP COLUMN {name}")
    con.commit()
    con.close()
    with Ledger(db) as led:  # reopened by the new code: columns added, the old task intact
        t = led.undispatched()[0]
        assert t.template_name == "t.png" and t.celery_id is None and t.worker is None
        led.assign_celery_id(t.id, "cid-1")
        assert led.undispatched() == [] and [x.celery_id for x in led.in_flight()] == ["cid-1"]
        led.mark_dispatched(t.id)
        led.mark_remote_progress(t.id, "w1@host", 2, 10, 50, 25.0, 1.6)
        t = led.task(t.id)
        assert (t.state, t.worker, t.attempts, t.progress_done) == ("running", "w1@host", 2, 10)
        assert led.requeue_running() == 0 and led.task(t.id).state == "running"  # farm tasks are re-attached
        led.worker_seen("w1@host", active=1, processed=3)
        assert [(w.hostname, w.active, w.processed) for w in led.workers()] == [("w1@host", 1, 3)]


def test_in_flight_splits_confirmed_from_unconfirmed_sends(led, tmp_path):
    a, b = led.add_recording(tmp_path / "a.flv", "fp", 1, [("t1.png", "t1"), ("t2.png", "t2")],
                             output_dir=tmp_path / "out").task_ids
    led.assign_celery_id(a, "cid-a")
    led.assign_celery_id(b, "cid-b")
    led.mark_dispatched(a)
    ids = lambda sent: [t.celery_id for t in led.in_flight(sent)]  # noqa: E731
    assert ids(None) == ["cid-a", "cid-b"] and ids(True) == ["cid-a"] and ids(False) == ["cid-b"]
