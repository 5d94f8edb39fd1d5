"""The dashboard's JSON API: submit (single, batch, duplicates, refusals), status, history, downloads, ZIP,
delete, templates, the token and every path-escape trick we know of."""
from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastapi.testclient import TestClient  # the "web" extra

from heygem_watch.ledger import Ledger
from heygem_watch.web.api import WebConfig, create_app
from heygem_watch.web.files import sanitize_name, sweep_partials
from heygem_watch.web.server import check_bind, cli_web
from tests.mediagen import face_frames, speech_like, write_video

BASE = "http://127.0.0.1:7860"
TOKEN = "s3cret-token-for-tests"


# ------------------------------------------------------------------ media and a stand-in worker
def color_frames(n: int, size=(64, 96), color=(40, 120, 200)):
    for i in range(n):
        img = np.zeros((*size, 3), np.uint8)
        img[:] = color
        img[:, (i * 5) % size[1]] = 255  # a moving line: frames differ
        yield img


def make_recording(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    return write_video(path, color_frames(int(10 * seconds)), fps=10, audio=speech_like(seconds, seed=seed))


def make_template(path: Path, color=(200, 80, 40), n: int = 6) -> Path:
    if path.suffix == ".png":
        import cv2

        cv2.imwrite(str(path), next(color_frames(1, color=color)))
        return path
    return write_video(path, color_frames(n, color=color), fps=10)


def fake_work_one(var: Path, steps: int = 4, step_s: float = 0.0) -> int | None:
    """Claim one task like the daemon does, move its progress, write a real (tiny) MP4 where the daemon files it,
    finish it; file the recording (manifest.json, state) when its last task ends. Returns the task id."""
    with Ledger(var / "ledger.sqlite3") as db:
        t = db.claim_next_task()
        if t is None:
            return None
        r = db.recording(t.recording_id)
        total = 8 * steps
        for k in range(1, steps + 1):
            time.sleep(step_s)
            db.update_progress(t.id, 8 * k, total, 8.0, (steps - k) * step_s)
        out = Path(r.output_dir) / f"{Path(t.template_name).stem}.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_video(out, color_frames(total, color=(30 * t.id % 255, 90, 160)), fps=10, audio=speech_like(total / 10))
        db.finish_task(t.id, out, {"wall_s": steps * step_s})
        tasks = db.tasks_for(r.id)
        if all(x.state in ("done", "failed") for x in tasks):
            manifest = {"recording": r.name, "outputs": [Path(x.output_path).name for x in tasks if x.output_path]}
            (Path(r.output_dir) / "manifest.json").write_text(json.dumps(manifest))
            db.set_recording_state(r.id, "done")
        return t.id


# ------------------------------------------------------------------ fixtures
@pytest.fixture()
def env(tmp_path):
    var, tdir = tmp_path / "var", tmp_path / "templates"
    tdir.mkdir()
    media = tmp_path / "media"
    media.mkdir()
    make_template(tdir / "anna.mp4")
    make_template(tdir / "ben.png", color=(30, 160, 30))
    return var, tdir, media


def client_for(var, tdir, **kw) -> TestClient:
    cfg = WebConfig(var, tdir, face_check=kw.pop("face_check", False), **kw)
    return TestClient(create_app(cfg), base_url=BASE)


def submit(c: TestClient, rec: Path, templates=(), uploads=(), name: str | None = None):
    files = [("recording", (name or rec.name, rec.read_bytes(), "video/mp4"))]
    files += [("template_files", (p.name, p.read_bytes(), "application/octet-stream")) for p in uploads]
    return c.post("/api/submit", data={"templates": list(templates)}, files=files)


# ------------------------------------------------------------------ submit
def test_single_submit_queues_one_task_and_status_shows_position(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    rec = make_recording(media / "talk.mp4")
    r = submit(c, rec, ["anna.mp4"])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["duplicate_of"] is None and len(body["task_ids"]) == 1 and body["batch"] is None
    with Ledger(var / "ledger.sqlite3") as db:
        rec_row = db.recording(body["recording_id"])
        assert rec_row.source == "web"
        assert Path(rec_row.source_path).read_bytes() == rec.read_bytes()
        assert Path(rec_row.source_path).parent.parent == (var / "uploads").resolve()
        assert [t.template_name for t in db.tasks_for(rec_row.id)] == ["anna.mp4"]
    assert not list((var / "uploads").rglob(".partial-*")), "temporary upload left behind"
    st = c.get("/api/status").json()
    assert st["counts"]["queued"] == 1 and st["running"] == []
    assert st["queued"][0]["position"] == 1 and st["queued"][0]["template"] == "anna.mp4"
    hist = c.get("/api/recordings").json()
    assert hist["days"][0]["recordings"][0]["tasks"][0]["state"] == "queued"


def test_status_and_submit_say_when_the_renderer_is_not_running(env):
    """Issue 11 item 12: no daemon -> /api/status says "renderer not running", the submit answer says the job
    waits for it; with a fresh heartbeat both say it runs."""
    var, tdir, media = env
    c = client_for(var, tdir)
    r = submit(c, make_recording(media / "talk.mp4"), ["anna.mp4"])
    assert r.status_code == 201
    assert r.json()["renderer"]["running"] is False and "wait" in r.json()["note"]
    st = c.get("/api/status").json()
    assert st["renderer"]["running"] is False and "not running" in st["renderer"]["message"]
    with Ledger(var / "ledger.sqlite3") as db:
        db.beat()  # another process's write: the status snapshot sees it at once
    assert c.get("/api/status").json()["renderer"]["running"] is True
    r = submit(c, make_recording(media / "talk2.mp4", seed=2), ["anna.mp4"])
    assert r.json()["renderer"]["running"] is True and "note" not in r.json()


def test_batch_with_library_and_uploaded_template_is_one_batch(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    rec = make_recording(media / "batch.wav.mp4")
    new_tpl = make_template(media / "carl.mp4", color=(10, 10, 200))
    r = submit(c, rec, ["anna.mp4", "ben.png"], uploads=[new_tpl])
    assert r.status_code == 201, r.text
    body = r.json()
    assert len(body["task_ids"]) == 3 and body["batch"]
    assert (tdir / "carl.mp4").read_bytes() == new_tpl.read_bytes(), "uploaded template not in the library"
    b = c.get(f"/api/batches/{body['batch']}").json()
    assert [t["template_name"] for t in b["recordings"][0]["tasks"]] == ["anna.mp4", "ben.png", "carl.mp4"]
    # the worker runs the first; status says "1 of 3" and names the template
    with Ledger(var / "ledger.sqlite3") as db:
        t = db.claim_next_task()
        db.update_progress(t.id, 5, 20, 12.5, 1.2)
    st = c.get("/api/status").json()
    run = st["running"][0]
    assert (run["k"], run["n"]) == (1, 3) and run["task"]["template_name"] == "anna.mp4"
    assert run["task"]["progress_done"] == 5 and run["task"]["progress_total"] == 20
    assert [q["position"] for q in st["queued"]] == [1, 2]


def test_concurrent_double_submit_makes_one_recording(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    rec = make_recording(media / "twice.mp4", seconds=2.0)
    out, barrier = [], threading.Barrier(2)

    def go():
        barrier.wait()
        out.append(submit(c, rec, ["anna.mp4"]))

    ts = [threading.Thread(target=go) for _ in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    codes = sorted(r.status_code for r in out)
    assert codes == [200, 201], [r.text for r in out]
    first = next(r.json() for r in out if r.status_code == 201)
    dup = next(r.json() for r in out if r.status_code == 200)
    assert dup["duplicate_of"] == first["recording_id"] and dup["task_ids"] == []
    with Ledger(var / "ledger.sqlite3") as db:
        assert len(db.recent_recordings(10)) == 1 and db.counts()["queued"] == 1
    assert len([p for p in (var / "uploads").rglob("*") if p.is_file()]) == 1


@pytest.mark.parametrize("name,content,status,words", [
    ("notes.mp4", b"this is just text, renamed\n" * 50, 415, "notes.mp4"),
    ("notes.txt", b"hello", 415, "not accepted"),
    ("empty.mp4", b"", 400, "empty"),
])
def test_bad_recordings_are_refused_with_a_message(env, name, content, status, words):
    var, tdir, _ = env
    c = client_for(var, tdir)
    r = c.post("/api/submit", data={"templates": ["anna.mp4"]}, files=[("recording", (name, content, "video/mp4"))])
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert not [p for p in (var / "uploads").rglob("*") if p.is_file()], "refused upload left a file"


def test_size_limit_missing_template_and_silent_video(env):
    var, tdir, media = env
    c = client_for(var, tdir, max_upload_mb=1)
    big = media / "big.mp4"
    big.write_bytes(os.urandom(1_300_000))
    r = submit(c, big, ["anna.mp4"])
    assert r.status_code == 413 and "1 MB" in r.json()["error"]
    rec = make_recording(media / "ok.mp4")
    assert submit(c, rec, []).status_code == 400
    r = submit(c, rec, ["nobody.mp4"])
    assert r.status_code == 404 and "nobody.mp4" in r.json()["error"]
    silent = write_video(media / "silent.mp4", color_frames(5), fps=10)
    r = submit(c, silent, ["anna.mp4"])
    assert r.status_code == 415 and "no audio" in r.json()["error"]


def test_names_are_sanitised_chinese_kept(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    rec = make_recording(media / "a.mp4", seed=1)
    r = submit(c, rec, ["anna.mp4"], name="../../直播 录音 第1场.flv.mp4")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "直播 录音 第1场.flv.mp4"
    stored = [p for p in (var / "uploads").rglob("*") if p.is_file()]
    assert [p.name for p in stored] == ["直播 录音 第1场.flv.mp4"]
    assert sanitize_name("..") == "upload" and sanitize_name("/etc/passwd") == "passwd"
    assert sanitize_name("C:\\Users\\x\\..\\evil.MP4") == "evil.mp4"
    assert "/" not in sanitize_name("a/../../b\x00c.mp4") and ".." not in sanitize_name("a/../../b..c.mp4")


# ------------------------------------------------------------------ results
def test_results_video_thumb_zip_delete_then_duplicate(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    rec = make_recording(media / "show.mp4")
    body = submit(c, rec, ["anna.mp4", "ben.png"]).json()
    while fake_work_one(var):
        pass
    rv = c.get(f"/api/recordings/{body['recording_id']}").json()
    assert rv["n_done"] == 2 and all(t["has_output"] for t in rv["tasks"])
    assert rv["tasks"][0]["media"]["duration_s"] > 0.5
    tid = body["task_ids"][0]
    v = c.get(f"/api/tasks/{tid}/video")
    assert v.status_code == 200 and v.headers["content-type"] == "video/mp4" and v.content[4:8] == b"ftyp"
    part = c.get(f"/api/tasks/{tid}/video", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100  # the <video> element seeks with ranges
    assert "attachment" in c.get(f"/api/tasks/{tid}/video?download=true").headers["content-disposition"]
    th = c.get(f"/api/tasks/{tid}/thumb")
    assert th.status_code == 200 and th.content[:2] == b"\xff\xd8"
    z = c.get(f"/api/recordings/{body['recording_id']}/zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert sorted(zf.namelist()) == ["anna.mp4", "ben.mp4", "manifest.json"]
        assert zf.testzip() is None
        with Ledger(var / "ledger.sqlite3") as db:
            assert zf.read("anna.mp4") == Path(db.task(tid).output_path).read_bytes()
    rel = Path(rv["output_dir"]).relative_to((var / "outputs").resolve()) / "manifest.json"
    assert c.get(f"/api/files/{rel.as_posix()}").json()["outputs"] == ["anna.mp4", "ben.mp4"]
    # delete: files gone, history hides it, the same content is still a duplicate
    d = c.delete(f"/api/recordings/{body['recording_id']}")
    assert d.status_code == 200 and sorted(d.json()["files"]) == ["anna.mp4", "ben.mp4"]
    assert not Path(rv["output_dir"]).exists()
    assert c.get("/api/recordings").json()["days"] == []
    assert c.get(f"/api/tasks/{tid}/video").status_code == 404
    assert submit(c, rec, ["anna.mp4"]).json()["duplicate_of"] == body["recording_id"]


def test_failed_recording_shows_error_json_and_log(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    body = submit(c, make_recording(media / "bad take.mp4"), ["anna.mp4"]).json()
    with Ledger(var / "ledger.sqlite3") as db:
        t = db.claim_next_task()
        db.fail_task(t.id, "no face found in any frame of the template")
        r = db.recording(body["recording_id"])
        db.set_recording_state(r.id, "failed", error="all templates failed")
    (var / "failed" / r.day).mkdir(parents=True)
    (var / "failed" / r.day / "bad take.mp4.error.json").write_text(json.dumps({"error": "all templates failed: face"}))
    (var / "logs" / r.day).mkdir(parents=True)
    (var / "logs" / r.day / "bad take.jsonl").write_text('{"event": "task_failed"}\n')
    rv = c.get(f"/api/recordings/{r.id}").json()
    assert rv["state"] == "failed" and rv["error_json"]["error"].startswith("all templates failed")
    assert rv["tasks"][0]["error"].startswith("no face")
    assert rv["log"] == ['{"event": "task_failed"}']
    assert c.get(f"/api/recordings/{r.id}/log").json()["lines"] == rv["log"]
    assert c.get(f"/api/recordings/{r.id}/zip").status_code == 404
    assert c.get("/api/recordings/9999").status_code == 404


# ------------------------------------------------------------------ templates
def test_template_library_upload_list_thumb_delete(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    lst = {t["name"]: t for t in c.get("/api/templates").json()["templates"]}
    assert set(lst) == {"anna.mp4", "ben.png"}
    assert (lst["anna.mp4"]["width"], lst["anna.mp4"]["height"], lst["anna.mp4"]["fps"]) == (96, 64, 10.0)
    assert lst["ben.png"]["is_image"] is True
    tpl = make_template(media / "模板 一.mp4", color=(0, 0, 255))
    up = c.post("/api/templates", files=[("files", (tpl.name, tpl.read_bytes(), "video/mp4"))])
    assert up.status_code == 201 and up.json()["templates"][0]["name"] == "模板 一.mp4"
    again = c.post("/api/templates", files=[("files", ("copy.mp4", tpl.read_bytes(), "video/mp4"))])
    assert again.json()["templates"][0]["name"] == "模板 一.mp4", "same content must not be stored twice"
    txt = c.post("/api/templates", files=[("files", ("fake.png", b"not an image", "image/png"))])
    assert txt.status_code == 415 and not (tdir / "fake.png").exists()
    th = c.get("/api/templates/模板 一.mp4/thumb")
    assert th.status_code == 200 and th.content[:2] == b"\xff\xd8"
    submit(c, make_recording(media / "r.mp4"), ["模板 一.mp4"])
    busy = c.delete("/api/templates/模板 一.mp4")  # a queued job still needs it
    assert busy.status_code == 409 and (tdir / "模板 一.mp4").exists()
    while fake_work_one(var):
        pass
    assert c.delete("/api/templates/模板 一.mp4").status_code == 200 and not (tdir / "模板 一.mp4").exists()
    assert c.delete("/api/templates/模板 一.mp4").status_code == 404


def test_face_check_runs_in_background(env):
    var, tdir, media = env
    write_video(tdir / "face.mp4", face_frames(4, size=(192, 160)), fps=10)
    c = client_for(var, tdir, face_check=True)
    deadline = time.monotonic() + 60
    while True:
        faces = {t["name"]: t["face"] for t in c.get("/api/templates").json()["templates"]}
        if all(f["state"] != "pending" for f in faces.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert faces["face.mp4"]["state"] == "done" and faces["face.mp4"]["face_fraction"] == 1.0
    assert faces["anna.mp4"]["state"] == "error" and "no face" in faces["anna.mp4"]["message"]


# ------------------------------------------------------------------ security
def test_no_path_escapes(env, tmp_path):
    var, tdir, media = env
    c = client_for(var, tdir)
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (var / "outputs").mkdir(parents=True, exist_ok=True)
    (var / "outputs" / "link.mp4").symlink_to(secret)
    (tdir / "evil.mp4").symlink_to(secret)
    (tdir / "evil2.png").symlink_to(tmp_path / "media")
    # these reach the handlers and are stopped by the confinement check itself
    confined = ["/api/files/%2e%2e/ledger.sqlite3", "/api/files/..%2f..%2fsecret.txt",
                "/api/files/%2e%2e%2f%2e%2e%2fsecret.txt", f"/api/files/{secret}",
                f"/api/files/%2F{str(secret).lstrip('/')}", "/api/files/link.mp4",
                "/api/files/%252e%252e/%252e%252e/secret.txt", "/api/templates/evil.mp4/thumb"]
    # these never match a route, or are refused as names
    other = ["/api/templates/..%2f..%2fsecret.txt/thumb", "/api/templates/%2e%2e/thumb",
             "/api/templates/%2e%2e%2fvar%2fledger.sqlite3/thumb", "/api/recordings/..%2f1/zip",
             "/static/%2e%2e/api.py", "/static/..%2f..%2fledger.py"]
    for url in confined + other:
        r = c.get(url)
        assert r.status_code == 403 if url in confined else r.status_code in (400, 404, 422), (url, r.status_code)
        assert b"top secret" not in r.content, url
    for name in ["..%2fsecret.txt", "%2e%2e", "evil.mp4", "evil2.png"]:
        assert c.delete(f"/api/templates/{name}").status_code in (400, 403, 404), name
    assert secret.exists() and (tmp_path / "media").is_dir()
    assert "evil.mp4" not in [t["name"] for t in c.get("/api/templates").json()["templates"]]
    # a ledger row pointing outside var/ (tampered db) is not served either
    rec = make_recording(media / "x.mp4")
    body = submit(c, rec, ["anna.mp4", "../../../secret.txt"])
    assert body.status_code in (400, 404)
    body = submit(c, rec, ["anna.mp4"]).json()
    with Ledger(var / "ledger.sqlite3") as db:
        t = db.claim_next_task()
        db.finish_task(t.id, secret, {})
    assert c.get(f"/api/tasks/{body['task_ids'][0]}/video").status_code == 403
    # an uploaded template named like a path lands in the template dir under a plain name
    tpl = make_template(media / "t.mp4", color=(1, 2, 3))
    up = c.post("/api/templates", files=[("files", ("../../../evil3.mp4", tpl.read_bytes(), "video/mp4"))])
    assert up.status_code == 201 and (tdir / "evil3.mp4").exists() and not (tmp_path / "evil3.mp4").exists()


def test_token_header_bearer_cookie_and_host_checks(env):
    var, tdir, _ = env
    c = client_for(var, tdir, token=TOKEN)
    assert c.get("/api/status").status_code == 401
    assert c.get("/api/status", headers={"X-HeyGem-Token": "wrong"}).status_code == 401
    assert c.get("/api/status", headers={"X-HeyGem-Token": TOKEN}).status_code == 200
    assert c.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/").status_code == 200, "the page itself loads so the token can be entered"
    assert c.get("/api/auth").json() == {"required": True, "ok": False}
    assert c.post("/api/login", data={"token": "nope"}).status_code == 401
    assert c.post("/api/login", data={"token": TOKEN}).status_code == 200
    assert c.get("/api/status").status_code == 200, "cookie from /api/login"
    open_c = client_for(var, tdir)
    assert open_c.get("/api/status", headers={"Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    assert open_c.get("/api/status", headers={"Host": "localhost:7860"}).status_code == 200
    r = open_c.post("/api/submit", headers={"Origin": "http://evil.example"}, files=[("recording", ("a.mp4", b"x"))])
    assert r.status_code == 403


def test_bind_rules_and_cli_refuses_without_token(env, capsys):
    assert check_bind("127.0.0.1", None) is None and check_bind("::1", None) is None
    assert check_bind("localhost", "") is None
    assert "HEYGEM_WEB_TOKEN" in check_bind("0.0.0.0", None)
    assert "HEYGEM_WEB_TOKEN" in check_bind("192.168.1.20", "")
    assert check_bind("0.0.0.0", TOKEN) is None
    assert "too short" in check_bind("0.0.0.0", "abc")
    var, tdir, _ = env

    class S:
        web_host, web_port, web_token, web_max_upload_mb = "127.0.0.1", 7860, "", 100
        var_dir, template_dir, extensions = var, tdir, (".mp4",)

    class A:
        host, port = "0.0.0.0", None

    assert cli_web(A(), S()) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


def test_stale_partials_are_swept_fresh_ones_kept(tmp_path):
    d = tmp_path / "uploads" / "2026-01-01"
    d.mkdir(parents=True)
    old, fresh, real = d / ".partial-aa.mp4", d / ".partial-bb.mp4", d / "talk.mp4"
    for p in (old, fresh, real):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(real, (time.time() - 7200, time.time() - 7200))
    assert sweep_partials([tmp_path / "uploads", tmp_path / "missing"]) == 1
    assert not old.exists() and fresh.exists() and real.exists()


# ------------------------------------------------------------------ retry, rerun, known content (issue #11)
def _finish_with(var: Path, states: dict[str, str]) -> None:
    """Work the queue like the daemon, failing the templates named in states with 'failed'; file the source."""
    import shutil

    with Ledger(var / "ledger.sqlite3") as db:
        while (t := db.claim_next_task()) is not None:
            if states.get(t.template_name) == "failed":
                db.fail_task(t.id, "engine failed")
            else:
                out = Path(db.recording(t.recording_id).output_dir) / f"{Path(t.template_name).stem}.mp4"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(b"mp4")
                db.finish_task(t.id, out, {})
            r = db.recording(t.recording_id)
            tasks = db.tasks_for(r.id)
            if all(x.state in ("done", "failed") for x in tasks):
                arch = var / "archive" / r.day / r.name
                arch.parent.mkdir(parents=True, exist_ok=True)
                if Path(r.source_path).exists():
                    shutil.move(r.source_path, arch)
                state = "done" if all(x.state == "done" for x in tasks) else "partial"
                db.set_recording_state(r.id, state, final_path=arch)


def test_retry_button_endpoint_requeues_only_failed_tasks(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    body = submit(c, make_recording(media / "show.mp4"), ["anna.mp4", "ben.png"]).json()
    _finish_with(var, {"ben.png": "failed"})
    rid = body["recording_id"]
    r = c.post(f"/api/recordings/{rid}/retry")
    assert r.status_code == 200, r.text
    assert r.json()["queued"] == ["ben.png"] and r.json()["existing"] == ["anna.mp4"]
    with Ledger(var / "ledger.sqlite3") as db:
        assert [t.state for t in db.tasks_for(rid)] == ["done", "queued"]
        assert db.recording(rid).state == "queued" and "archive" in db.recording(rid).source_path
    again = c.post(f"/api/recordings/{rid}/retry")
    assert again.status_code == 409 and "no failed tasks" in again.json()["error"]
    assert c.post("/api/recordings/999/retry").status_code == 404


def test_render_with_endpoint_and_known_submit_say_what_was_queued(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    rec = make_recording(media / "show.mp4")
    body = submit(c, rec, ["anna.mp4"]).json()
    _finish_with(var, {})
    rid = body["recording_id"]
    r = c.post(f"/api/recordings/{rid}/rerun", data={"templates": ["anna.mp4", "ben.png"]})
    assert r.status_code == 200, r.text
    assert r.json()["queued"] == ["ben.png"] and r.json()["existing"] == ["anna.mp4"]
    _finish_with(var, {})
    make_template(tdir / "cleo.mp4", color=(10, 10, 250))
    again = submit(c, rec, ["anna.mp4", "cleo.mp4"])  # the same content once more, one new template
    assert again.status_code == 200 and again.json()["duplicate_of"] == rid
    assert again.json()["queued"] == ["cleo.mp4"] and again.json()["existing"] == ["anna.mp4"]
    with Ledger(var / "ledger.sqlite3") as db:
        assert [t.template_name for t in db.tasks_for(rid)] == ["anna.mp4", "ben.png", "cleo.mp4"]
        assert Path(db.recording(rid).source_path).read_bytes() == rec.read_bytes()  # renders from the upload
    none = submit(c, rec, ["anna.mp4"]).json()
    assert none["queued"] == [] and none["existing"] == ["anna.mp4"]
    assert c.post(f"/api/recordings/{rid}/rerun", data={"templates": ["../x.mp4"]}).status_code in (400, 404)


def test_unusable_template_is_shown_and_refused(env):
    var, tdir, media = env
    c = client_for(var, tdir)
    from heygem_watch.web.files import content_fingerprint

    with Ledger(var / "ledger.sqlite3") as db:
        db.set_template_check(content_fingerprint(tdir / "ben.png"), tdir / "ben.png", False,
                              "no face found in any frame of the template")
    tpls = {t["name"]: t for t in c.get("/api/templates").json()["templates"]}
    assert tpls["ben.png"]["unusable"].startswith("no face") and tpls["anna.mp4"]["unusable"] is None
    r = submit(c, make_recording(media / "x.mp4"), ["ben.png"])
    assert r.status_code == 422 and "unusable" in r.json()["error"]


def test_dashboard_has_the_retry_and_render_with_buttons():
    js = (Path(__file__).resolve().parents[1] / "heygem_watch" / "web" / "static" / "app.js").read_text()
    assert "Retry failed" in js and "/retry`" in js
    assert "Render with" in js and "/rerun`" in js and "unusable" in js


def test_status_shows_farm_tasks_with_their_worker_and_the_workers_seen(env):
    """Issue 12: a farm task running on a worker is listed like a local one, plus which worker; the workers the head
    heard from (heartbeats) with their state and current task."""
    var, tdir, media = env
    c = client_for(var, tdir)
    r = submit(c, make_recording(media / "talk.mp4"), ["anna.mp4", "ben.png"])
    a, b = r.json()["task_ids"]
    with Ledger(var / "ledger.sqlite3") as db:
        db.assign_celery_id(a, "cid-a")
        db.mark_dispatched(a)
        db.mark_remote_progress(a, "gpu0@box1", 1, 40, 100, 50.0, 1.2)
        db.worker_seen("gpu0@box1", active=1, processed=7)
        db.worker_seen("gpu1@box2", at=time.time() - 60)  # no heartbeat for a minute
    st = c.get("/api/status").json()
    assert [(x["task"]["id"], x["task"]["worker"], x["task"]["progress_done"]) for x in st["running"]] == \
        [(a, "gpu0@box1", 40)]
    assert st["queued"][0]["task_id"] == b
    ws = {w["hostname"]: w for w in st["workers"]}
    assert ws["gpu0@box1"]["state"] == "online" and ws["gpu0@box1"]["task"]["id"] == a
    assert ws["gpu0@box1"]["processed"] == 7
    assert ws["gpu1@box2"]["state"] == "lost" and ws["gpu1@box2"]["task"] is None


def test_a_thumbnail_shows_a_phone_video_upright(tmp_path):
    import cv2

    from heygem_watch.web.files import thumbnail

    shown = list(face_frames(3))  # 320 high, 384 wide as shown
    phone = write_video(tmp_path / "phone.mp4", [np.ascontiguousarray(np.rot90(f, -1)) for f in shown], 25,
                        display=(90, False))
    jpg = cv2.imread(str(thumbnail(phone, tmp_path / "thumbs")))
    assert jpg.shape[0] < jpg.shape[1]  # landscape as shown, not portrait as stored
    small = cv2.resize(shown[1], (jpg.shape[1], jpg.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(jpg.astype(int) - small).mean() < 8
