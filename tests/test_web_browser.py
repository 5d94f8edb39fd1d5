"""A real browser on the real thing: `heygem-watch run` and `heygem-watch web` as two processes on one var/,
Debian's headless Chromium driven by Playwright. Upload a template into the library, then a recording (FLV, Chinese
name) with a second template as a batch of two; watch the progress bar move; see two results; play one; download the
ZIP and check it holds both MP4s; reload; then drop the same recording into incoming/ and see it recognised as a
duplicate, not processed again.

Screenshots go to the test's tmp dir, and also to $HEYGEM_WEB_SCREENSHOTS when set (for looking at them).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

import playwright.sync_api as playwright_sync  # pip install playwright (the browser itself comes from Debian)

from heygem_watch.ledger import Ledger
from tests.conftest import dashboard
from tests.mediagen import face_frames, speech_like, write_video
from tests.redisd import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"]
RECORDING_S = 60.0  # 1500 frames per template: several seconds of rendering even on a fast core, so the page
#                    sees progress mid-way (24 s raced: both renders could finish between two page polls)
FPS = 25
TEMPLATE_HW = (384, 320)  # template height, width: big enough that rendering takes a few seconds per template
START_TIMEOUT_S = 60


def tinted(frames, gain):
    for f in frames:
        yield np.clip(f.astype(np.float32) * np.float32(gain), 0, 255).astype(np.uint8)


def slides(n: int):
    import cv2

    for i in range(n):
        img = np.full((180, 320, 3), (60, 40, 30), np.uint8)
        cv2.putText(img, f"{i / FPS:4.1f}s", (30, 110), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        yield img


def write_flv(path: Path, frames, audio: np.ndarray, rate: int = 16000) -> Path:
    """H.264 + AAC in FLV, packets interleaved by time (FLV needs that across streams)."""
    import av

    with av.open(str(path), "w", format="flv") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = 320, 180, "yuv420p"
        vs.codec_context.options = {"preset": "ultrafast"}
        as_ = out.add_stream("aac", rate=rate, layout="mono")
        pos = 0
        for i, img in enumerate(frames):
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="bgr24")))
            while pos < min(len(audio), (i + 1) * rate // FPS):
                fr = av.AudioFrame.from_ndarray(audio[None, pos:pos + 1024].astype(np.float32), format="flt",
                                                layout="mono")
                fr.sample_rate, fr.pts = rate, pos
                out.mux(as_.encode(fr))
                pos += 1024
        out.mux(vs.encode(None))
        out.mux(as_.encode(None))
    return path


@pytest.fixture()
def stack(tmp_path):
    """`heygem-watch run` + `heygem-watch web` on tmp_path/var; yields (url, var)."""
    var, port = tmp_path / "var", free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HEYGEM_VAR_DIR=str(var), HEYGEM_SETTLE_SECONDS="0",
               HEYGEM_MIN_FREE_MB="0", HEYGEM_X264_PRESET="ultrafast", HEYGEM_LOG_FORMAT="json",
               HEYGEM_ENGINE="builtin", HEYGEM_RESCAN_SECONDS="2", HEYGEM_WEB_TOKEN="")
    env = {k: v for k, v in env.items() if not (k.startswith("HEYGEM_") and k not in {
        "HEYGEM_VAR_DIR", "HEYGEM_SETTLE_SECONDS", "HEYGEM_MIN_FREE_MB", "HEYGEM_X264_PRESET", "HEYGEM_LOG_FORMAT",
        "HEYGEM_ENGINE", "HEYGEM_RESCAN_SECONDS", "HEYGEM_WEB_TOKEN"})}
    logs = {n: open(tmp_path / f"{n}.log", "wb") for n in ("run", "web")}
    procs = {"run": subprocess.Popen([sys.executable, "-m", "heygem_watch", "run"], cwd=tmp_path, env=env,
                                     stdout=logs["run"], stderr=subprocess.STDOUT),
             "web": subprocess.Popen([sys.executable, "-m", "heygem_watch", "web", "--port", str(port)], cwd=tmp_path,
                                     env=env, stdout=logs["web"], stderr=subprocess.STDOUT)}
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(url + "/api/config", timeout=1).read()
            if (var / "incoming").is_dir():
                break
        except OSError:
            pass
        if any(p.poll() is not None for p in procs.values()) or time.monotonic() > deadline:
            for p in procs.values():
                p.kill()
            pytest.fail("stack did not start:\n" + "\n".join(
                f"--- {n}\n{(tmp_path / f'{n}.log').read_text(errors='replace')[-3000:]}" for n in procs))
        time.sleep(0.2)
    yield url, var
    for p in procs.values():
        p.terminate()
    for n, p in procs.items():
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
        logs[n].close()


def shot(page, tmp_path: Path, name: str, full: bool = True) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=full)
    dest = os.environ.get("HEYGEM_WEB_SCREENSHOTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(dest) / name)


@contextlib.contextmanager
def dashboard_page(tmp_path: Path, var: Path):
    """A 1280x900 headless Chromium page opened on dashboard(tmp_path, var); the browser is closed after."""
    with dashboard(tmp_path, var) as url, playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


def test_batch_of_two_in_a_real_browser(stack, tmp_path):
    assert Path(CHROMIUM).exists(), "needs Debian's Chromium: apt-get install -y chromium"
    url, var = stack
    media = tmp_path / "media"
    media.mkdir()
    rec = write_flv(media / "周一直播 第3场.flv", slides(int(RECORDING_S * FPS)), speech_like(RECORDING_S, seed=3))
    tpl_a = write_video(media / "presenter_warm.mp4", tinted(face_frames(25, TEMPLATE_HW), (0.85, 0.95, 1.12)), fps=FPS)
    tpl_b = write_video(media / "presenter_cool.mp4", tinted(face_frames(25, TEMPLATE_HW), (1.12, 1.0, 0.88)), fps=FPS)
    with playwright_sync.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            accept_downloads=True, viewport={"width": 1280, "height": 900})
        try:
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            # the library: one template uploaded through the page; its face check comes back
            page.set_input_files("#library-upload-input", str(tpl_a))
            page.wait_for_selector('#template-list .tpl[data-name="presenter_warm.mp4"] .face.ok', timeout=30_000)
            # a batch: that template + one uploaded with the job
            page.check("#mode-batch")
            page.wait_for_selector('#template-choices input[type=checkbox][value="presenter_warm.mp4"]')
            page.check('#template-choices input[value="presenter_warm.mp4"]')
            page.set_input_files("#recording-input", str(rec))
            page.set_input_files("#template-upload-input", str(tpl_b))
            page.click("#submit-btn")
            page.wait_for_selector("#submit-msg.ok")
            submitted = time.strftime("%H:%M:%S", time.gmtime())
            assert "2 job(s)" in page.inner_text("#submit-msg")
            # the progress bar moves: a value strictly between 0 and the total is seen, then a larger one
            try:
                page.wait_for_selector(".run .progress-fill", timeout=30_000)
            except playwright_sync.TimeoutError:
                status = urllib.request.urlopen(url + "/api/status", timeout=5).read().decode()
                pytest.fail(f"no running task shown (submitted {submitted} UTC); /api/status: {status}\ndaemon log:\n"
                            + (tmp_path / "run.log").read_text(errors="replace")[-4000:])
            seen: list[tuple[int, int]] = []
            batch_texts: set[str] = set()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                # one snapshot of the running card (the page re-renders it every second)
                run = page.evaluate("""(() => { const r = document.querySelector('.run');
                    if (!r) return null;
                    return [+r.querySelector('.progress-fill').dataset.done,
                            +(r.querySelector('.frames').textContent.split('/')[1].trim().split(' ')[0]) || 0,
                            r.querySelector('.run-sub').textContent.split('·')[0].trim()]; })()""")
                if run:
                    done, total, batch_text = run
                    batch_texts.add(batch_text)
                    if not seen or seen[-1] != (done, total):
                        seen.append((done, total))
                        if 0 < done < total and not (tmp_path / "web-progress.png").exists():
                            shot(page, tmp_path, "web-progress.png")
                if page.evaluate("document.querySelectorAll('#history-list .result[data-state=done] .play-btn')"
                                 ".length") == 2:
                    break
                page.wait_for_timeout(100)
            assert any(0 < d < t for d, t in seen), f"no progress seen mid-way: {seen}"
            assert batch_texts and batch_texts <= {"Batch: 1 of 2", "Batch: 2 of 2"}, batch_texts
            page.wait_for_selector("#running-list .hint")
            page.wait_for_timeout(800)  # thumbnails
            shot(page, tmp_path, "web-history.png")
            text = page.inner_text("#history-list")
            assert "周一直播 第3场.flv" in text and "presenter_warm.mp4" in text and "presenter_cool.mp4" in text
            # play one
            page.click("#history-list .play-btn >> nth=0")
            page.wait_for_function("(() => { const v = document.querySelector('#player');"
                                   " return v.readyState >= 2 && v.currentTime > 0.5; })()", timeout=20_000)
            assert page.evaluate("[document.querySelector('#player').videoWidth,"
                                 " document.querySelector('#player').videoHeight]") == [TEMPLATE_HW[1], TEMPLATE_HW[0]]
            assert abs(page.evaluate("document.querySelector('#player').duration") - RECORDING_S) < 0.2
            shot(page, tmp_path, "web-player.png", full=False)
            page.click("#player-close")
            # the ZIP
            with page.expect_download() as dl:
                page.click("#history-list .zip-link >> nth=0")
            zpath = tmp_path / "out.zip"
            dl.value.save_as(str(zpath))
            with zipfile.ZipFile(zpath) as zf:
                assert sorted(n for n in zf.namelist() if n.endswith(".mp4")) == ["presenter_cool.mp4",
                                                                                 "presenter_warm.mp4"]
                assert zf.testzip() is None
                assert json.loads(zf.read("manifest.json"))["state"] == "done"
            # a reload loses nothing
            page.reload()
            page.wait_for_function("document.querySelectorAll('#history-list .result[data-state=done]').length == 2")
            assert not errors, errors
        finally:
            ctx.close()
    # the same recording dropped into incoming/ is a duplicate: no new recording, no new task
    shutil.copy(rec, var / "incoming" / "again.flv")
    with Ledger(var / "ledger.sqlite3") as db:
        deadline = time.monotonic() + 30
        while not db.events("duplicate") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert [e["recording_id"] for e in db.events("duplicate")] == [1]
        assert len(db.recent_recordings(10)) == 1 and db.counts() == {"queued": 0, "running": 0, "done": 2, "failed": 0}


def test_header_labels_and_renderer_banner(tmp_path):
    """Issue 11 items 12 and 16, in the page: templates whose names share a long prefix get labels that tell them
    apart (none cut off by the box); the header says which counts are renders and which recordings; with no daemon,
    a banner says the renderer is not running. Only `heygem-watch web` runs here."""
    assert Path(CHROMIUM).exists(), "needs Debian's Chromium: apt-get install -y chromium"
    var, tdir = tmp_path / "var", tmp_path / "var" / "templates"
    tdir.mkdir(parents=True)
    names = ["videoretalking_face2.mp4", "videoretalking_face3.mp4", "videoretalking_presenter_studio_front.mp4",
             "videoretalking_presenter_studio_side.mp4", "anna.mp4"]
    one = write_video(tmp_path / "one.mp4", face_frames(3, (96, 80)), fps=FPS)
    for n in names:
        shutil.copy(one, tdir / n)
    with Ledger(var / "ledger.sqlite3") as db:  # one recording failed with two templates, another waits
        r = db.add_recording(var / "x.flv", "f1", 10, [(str(tdir / names[0]), "a"), (str(tdir / names[1]), "b")],
                             output_dir=var / "outputs" / "x")
        for tid in r.task_ids:
            db.claim_next_task()
            db.fail_task(tid, "no face")
        db.set_recording_state(r.recording_id, "failed", error="every template failed")
        db.add_recording(var / "y.flv", "f2", 10, [(str(tdir / names[2]), "c")], output_dir=var / "outputs" / "y")
    with dashboard_page(tmp_path, var) as page:
        page.wait_for_selector("#template-choices .choice")
        page.wait_for_selector("#renderer-banner:not(.hidden)")
        page.wait_for_load_state("networkidle")  # thumbnails and fonts in: the layout is final
        shot(page, tmp_path, "labels-header-banner.png", full=False)
        labels = page.eval_on_selector_all("#template-choices .choice span", """els => els.map(e => ({
            text: e.innerText, title: e.closest('.choice').title,
            clipped: e.scrollWidth > e.clientWidth || e.scrollHeight > e.clientHeight}))""")
        assert sorted(x["title"] for x in labels) == sorted(names)
        assert len({x["text"] for x in labels}) == len(names), labels
        assert not any(x["clipped"] for x in labels), labels
        header = page.inner_text("#counts")
        assert "renders" in header and "recordings" in header, header
        assert page.inner_text("#counts .chip.failed") == "failed 2"  # the two templates' renders
        assert page.inner_text("#counts .chip.rec-failed") == "failed 1"  # the one recording
        banner = page.inner_text("#renderer-banner")
        assert "renderer not running" in banner and "wait" in banner, banner


def test_retry_failed_and_render_with_buttons_in_a_real_browser(tmp_path):
    """Dashboard only (no daemon): a partial recording filed in archive/; "Retry failed" queues its failed
    template again, "Render with…" queues a library template it never had."""
    assert Path(CHROMIUM).exists(), "needs Debian's Chromium: apt-get install -y chromium"
    import cv2

    var = tmp_path / "var"
    tdir = var / "templates"
    tdir.mkdir(parents=True)
    for name, gain in (("anna.png", (0.85, 0.95, 1.12)), ("ben.png", (1.12, 1.0, 0.88)), ("cleo.png", (1, 1, 1))):
        cv2.imwrite(str(tdir / name), next(tinted(face_frames(1, (192, 160)), gain)))  # faces: all usable
    wall = np.full((120, 160, 3), (60, 140, 200), np.uint8)
    cv2.rectangle(wall, (20, 20), (80, 80), (255, 255, 255), -1)
    cv2.imwrite(str(tdir / "wall.png"), wall)  # no face: the face check marks it unusable
    src = var / "archive" / time.strftime("%Y-%m-%d") / "show.mp4"
    src.parent.mkdir(parents=True)
    write_video(src, (np.full((48, 64, 3), 90, np.uint8) for _ in range(10)), fps=10, audio=speech_like(1.0))
    from heygem_watch.ledger import fingerprint_file

    with Ledger(var / "ledger.sqlite3") as db:
        res = db.add_recording(src, fingerprint_file(src), src.stat().st_size,
                               [(str(tdir / n), fingerprint_file(tdir / n)) for n in ("anna.png", "ben.png")],
                               output_dir=var / "outputs" / "x" / "show")
        a = db.claim_next_task()
        db.finish_task(a.id, var / "outputs" / "x" / "show" / "anna.mp4", {})
        b = db.claim_next_task()
        db.fail_task(b.id, "engine failed")
        db.set_recording_state(res.recording_id, "partial", final_path=src)
    with dashboard(tmp_path, var) as url:
        with playwright_sync.sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900})
            try:
                page = ctx.new_page()
                errors: list[str] = []
                dialogs: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
                page.goto(url + "/")
                page.wait_for_selector(".retry-rec")
                page.wait_for_selector(".rerun summary")
                shot(page, tmp_path, "web-retry-rerun.png")
                page.click(".retry-rec")
                try:
                    page.wait_for_function("document.querySelectorAll('.result[data-state=queued]').length == 1",
                                           timeout=10_000)
                except playwright_sync.TimeoutError:
                    pytest.fail(f"dialogs {dialogs}, errors {errors}")
                assert dialogs and "ben.png" in dialogs[-1]
                renders = page.evaluate("""new Promise((ok) => { let n = 0;
                    new MutationObserver(() => n++).observe(document.querySelector('#history-list'), {childList: true});
                    setTimeout(() => ok(n), 5000); })""")
                assert renders <= 3, f"history re-rendered {renders} times in 5 s"
                page.wait_for_selector('.tpl[data-name="wall.png"] .unusable', timeout=60_000)
                assert "no face" in page.inner_text('.tpl[data-name="wall.png"] .unusable')
                assert page.is_disabled('#template-choices input[value="wall.png"]')  # cannot be picked for a job
                shot(page, tmp_path, "web-unusable-template.png")
                page.click(".rerun summary")
                assert page.locator('.rerun input[value="wall.png"]').count() == 0  # not offered
                page.check('.rerun input[value="cleo.png"]')
                shot(page, tmp_path, "web-render-with.png", full=False)
                page.click(".rerun-go")
                page.wait_for_function("document.querySelectorAll('.result[data-state=queued]').length == 2")
                assert "queued: cleo.png" in dialogs[-1]
                assert errors == []
            finally:
                ctx.close()
    with Ledger(var / "ledger.sqlite3") as db:
        tasks = {t.template_name: t.state for t in db.tasks_for(res.recording_id)}
        assert tasks == {"anna.png": "done", "ben.png": "queued", "cleo.png": "queued"}
        assert db.recording(res.recording_id).source_path == str(src)


def test_farm_workers_and_the_worker_of_each_running_task_in_a_real_browser(tmp_path):
    """Issue 12, in the page: with HEYGEM_DISPATCH=celery the head records which worker renders each task and the
    workers' heartbeats; the dashboard shows the running task with its worker and the workers list (a silent one
    marked lost). Only `heygem-watch web` runs here, on a ledger written the way the head writes it."""
    assert Path(CHROMIUM).exists(), "needs Debian's Chromium: apt-get install -y chromium"
    var, tdir = tmp_path / "var", tmp_path / "var" / "templates"
    tdir.mkdir(parents=True)
    one = write_video(tmp_path / "one.mp4", face_frames(3, (96, 80)), fps=FPS)
    for n in ("anna.mp4", "ben.mp4"):
        shutil.copy(one, tdir / n)
    with Ledger(var / "ledger.sqlite3") as db:
        r = db.add_recording(var / "show.flv", "f1", 10, [(str(tdir / "anna.mp4"), "a"), (str(tdir / "ben.mp4"), "b")],
                             output_dir=var / "outputs" / "show")
        a, b = r.task_ids
        for tid, cid in ((a, "cid-a"), (b, "cid-b")):
            db.assign_celery_id(tid, cid)
            db.mark_dispatched(tid)
        db.mark_remote_progress(a, "gpu0@box1", 1, 300, 600, 61.5, 4.9)
        db.worker_seen("gpu0@box1", active=1, processed=12)
        db.worker_seen("gpu1@box2", processed=9, at=time.time() - 120)
        db.beat()
    with dashboard_page(tmp_path, var) as page:
        page.wait_for_selector("#workers-list li")
        page.wait_for_load_state("networkidle")
        shot(page, tmp_path, "farm-workers.png", full=False)
        run = page.inner_text(f'#running-list .run[data-task="{a}"]')
        assert "anna.mp4" in run and "gpu0@box1" in run and "300 / 600" in run, run
        assert page.is_visible("#workers")
        online = page.inner_text('#workers-list li.online[data-worker="gpu0@box1"]')
        assert f"task #{a}" in online and "12 done" in online, online
        lost = page.inner_text('#workers-list li.lost[data-worker="gpu1@box2"]')
        assert "idle" in lost and "lost" in lost, lost
        assert page.inner_text("#queue-list").count("ben.mp4") == 1
