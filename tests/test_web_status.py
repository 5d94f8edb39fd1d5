"""web/status.py: /api/status comes from a snapshot rebuilt only when the ledger changed, so many open dashboards
cost one ledger read per change, not one per request (the latency itself: bench/web_status.py)."""
from __future__ import annotations

from heygem_watch.ledger import Ledger
from heygem_watch.web.status import StatusSnapshot
from tests.test_web_api import client_for, env, make_recording, submit  # noqa: F401 (env: fixture)


def test_status_reads_the_ledger_once_per_change(env, monkeypatch):
    var, tdir, media = env
    builds = []
    real = StatusSnapshot.build
    monkeypatch.setattr(StatusSnapshot, "build", lambda self: builds.append(1) or real(self))
    c = client_for(var, tdir)
    assert submit(c, make_recording(media / "a.mp4"), ["anna.mp4"]).status_code == 201
    answers = [c.get("/api/status").json() for _ in range(50)]
    assert len(builds) == 1 and all(a == answers[0] for a in answers)
    assert [q["template"] for q in answers[0]["queued"]] == ["anna.mp4"] and answers[0]["queued"][0]["position"] == 1
    with Ledger(var / "ledger.sqlite3") as db:  # the daemon, another process, claims the task
        t = db.claim_next_task()
        db.update_progress(t.id, 5, 10, 2.0, 2.5)
    st = c.get("/api/status").json()
    assert len(builds) == 2 and st["queued"] == [] and st["running"][0]["task"]["progress_done"] == 5
    assert st["counts"]["running"] == 1 and st["recording_counts"]["running"] == 1
    assert submit(c, make_recording(media / "b.mp4", seed=1), ["anna.mp4", "ben.png"]).status_code == 201
    st = c.get("/api/status").json()  # this process's own submit shows at once
    assert [q["position"] for q in st["queued"]] == [1, 2] and st["queued_total"] == 2


def test_history_is_built_once_per_change_too(env, monkeypatch):
    var, tdir, media = env
    c = client_for(var, tdir)
    assert submit(c, make_recording(media / "a.mp4"), ["anna.mp4"]).status_code == 201
    reads = []
    real = Ledger.recent_recordings
    monkeypatch.setattr(Ledger, "recent_recordings", lambda self, limit=20: reads.append(limit) or real(self, limit))
    first = [c.get("/api/recordings?limit=100").json() for _ in range(30)]
    assert reads == [100] and all(h == first[0] for h in first)
    assert first[0]["days"][0]["recordings"][0]["tasks"][0]["state"] == "queued"
    with Ledger(var / "ledger.sqlite3") as db:  # the daemon fails the task: the next answer shows it
        t = db.claim_next_task()
        db.fail_task(t.id, "no face found")
    h = c.get("/api/recordings?limit=100").json()
    assert len(reads) == 2 and h["days"][0]["recordings"][0]["tasks"][0]["state"] == "failed"
