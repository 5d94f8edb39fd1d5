"""web/audit.py: the dashboard logs one JSON line per state-changing request and per refusal (who, what, result),
through the same logging setup as the daemon."""
from __future__ import annotations

import io
import json
import time
import urllib.request

from heygem_watch.logs import configure
from tests.conftest import dashboard
from tests.test_web_api import TOKEN, client_for, env, make_recording, make_template, submit  # noqa: F401 (env: fixture)


def _events(buf: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]


def test_changes_and_refusals_are_logged_reads_are_not(env):
    var, tdir, media = env
    buf = io.StringIO()
    configure("json", "info", stream=buf)
    c = client_for(var, tdir)
    assert submit(c, make_recording(media / "talk.mp4"), ["anna.mp4"]).status_code == 201
    assert c.get("/api/status").status_code == 200 and c.get("/api/templates").status_code == 200
    bad = media / "notes.txt"
    bad.write_text("hello")
    assert submit(c, bad, ["anna.mp4"]).status_code == 415
    assert c.delete("/api/templates/ben.png").status_code == 200
    assert c.delete("/api/templates/nobody.png").status_code == 404
    assert c.post("/api/submit", headers={"Origin": "http://evil.example"},
                  files=[("recording", ("a.mp4", b"x"))]).status_code == 403
    ev = _events(buf)
    assert all(e["event"] in ("web_request", "web_refused") for e in ev), ev
    assert len(ev) == 5, ev  # the two reads left no line
    sub, refused, deleted, missing, xsite = ev
    assert sub["event"] == "web_request" and sub["level"] == "info" and sub["client"] == "testclient"
    assert (sub["method"], sub["path"], sub["status"]) == ("POST", "/api/submit", 201)
    assert sub["recording_id"] == 1 and sub["task_ids"] == [1] and sub["templates"] == ["anna.mp4"]
    assert sub["name"] == "talk.mp4"
    assert refused["event"] == "web_refused" and refused["level"] == "warning" and refused["status"] == 415
    assert "notes.txt" in refused["reason"]
    assert (deleted["method"], deleted["path"], deleted["deleted"]) == ("DELETE", "/api/templates/ben.png", "ben.png")
    assert missing["status"] == 404 and "nobody.png" in missing["reason"]
    assert xsite["status"] == 403 and "cross-site" in xsite["reason"]


def test_a_page_without_its_token_is_not_a_flood(env):
    """A dashboard left open without the token polls every second; its refusals are logged once a minute with a count."""
    var, tdir, _ = env
    buf = io.StringIO()
    configure("json", "info", stream=buf)
    c = client_for(var, tdir, token=TOKEN)
    for _ in range(30):
        assert c.get("/api/status").status_code == 401
    assert c.post("/api/login", data={"token": "guess"}).status_code == 401
    ev = _events(buf)
    assert [(e["path"], e["status"]) for e in ev] == [("/api/status", 401), ("/api/login", 401)], ev
    assert ev[0]["reason"] == "token required"


def test_web_process_logs_json_like_the_daemon(env, tmp_path):
    """`heygem-watch web` with JSON logs: a start-up line and one line per upload, each a JSON object."""
    var, tdir, media = env
    with dashboard(tmp_path, var, HEYGEM_TEMPLATE_DIR=str(tdir)) as url:
        tpl = make_template(media / "carl.mp4", color=(9, 9, 200))
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"carl.mp4\"\r\n"
                f"Content-Type: video/mp4\r\n\r\n").encode() + tpl.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{url}/api/templates", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert urllib.request.urlopen(req, timeout=30).status == 201
        time.sleep(3)  # the face check runs MediaPipe in this process: its native chatter must stay JSON too
    lines = [x for x in (tmp_path / "web.log").read_text().splitlines() if x.strip()]
    for x in lines:
        assert isinstance(json.loads(x), dict), x
    ev = [json.loads(x) for x in lines]
    assert any(e["event"] == "web_started" for e in ev), ev
    up = [e for e in ev if e["event"] == "web_request"]
    assert len(up) == 1 and up[0]["path"] == "/api/templates" and up[0]["templates"] == ["carl.mp4"], ev
