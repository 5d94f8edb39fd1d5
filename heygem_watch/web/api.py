"""The dashboard's FastAPI app: the JSON API (documented in docs/web.md) and the static page.

The web process only submits and reads: an upload is stored under var/uploads/ (hidden temporary name, then an
atomic link to its final name), fingerprinted and handed to the ledger with the chosen templates; the daemon
(`heygem-watch run`) claims the tasks. Everything shown comes from the ledger and var/, so a refresh loses nothing.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from heygem_watch.web import files as F
from heygem_watch.web import security
from heygem_watch.web.audit import AuditLog
from heygem_watch.web.status import HISTORY_MAX_AGE_S, StatusSnapshot
from heygem_watch.web.templates import FaceChecker, describe, list_template_files

STATIC_DIR = Path(__file__).parent / "static"
HISTORY_LIMIT = 200  # recordings shown in history at most
DELETED_EVENT = "web_deleted"  # ledger event marking a recording whose results were deleted from the dashboard
LOG_LINES = 200  # lines of a recording's log returned with a failure
DEFAULT_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".flv", ".m4v", ".ts",
                      ".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus")


@dataclasses.dataclass
class WebConfig:
    """What the app needs from Settings (config.py); from_settings copies it."""

    var_dir: Path
    template_dir: Path
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    max_upload_mb: int = 2048
    token: str | None = None
    face_check: bool = True

    @classmethod
    def from_settings(cls, settings) -> "WebConfig":
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in
                     (getattr(settings, "extensions", None) or DEFAULT_EXTENSIONS))
        return cls(Path(settings.var_dir), Path(settings.template_dir), exts,
                   int(getattr(settings, "web_max_upload_mb", 2048) or 2048), getattr(settings, "web_token", None) or None)


def _jsonable(obj):
    """Ledger rows (dataclasses) -> plain JSON values; Paths become strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif hasattr(obj, "_asdict"):
        obj = obj._asdict()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    return obj


def create_app(cfg: WebConfig) -> FastAPI:
    """The app for one var/ folder and template folder."""
    var = cfg.var_dir.resolve()
    tdir = cfg.template_dir.resolve()
    uploads, outputs, failed, logs = var / "uploads", var / "outputs", var / "failed", var / "logs"
    thumbs = var / "cache" / "web-thumbs"
    checker = FaceChecker(var / "cache", ledger_path=var / "ledger.sqlite3") if cfg.face_check else None
    submit_lock = threading.Lock()  # fingerprint -> ledger in one step per process (double submit = one recording)
    max_bytes = cfg.max_upload_mb << 20
    app = FastAPI(title="heygem-watch", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.cfg = cfg
    snapshot = app.state.status = StatusSnapshot(var / "ledger.sqlite3")

    @contextmanager
    def ledger():
        from heygem_watch.ledger import Ledger

        db = Ledger(var / "ledger.sqlite3")
        try:
            yield db
        finally:
            db.close()

    security.install(app, cfg.token, max_bytes)
    app.add_middleware(AuditLog)  # added last = outermost: sees the guard's refusals too

    @app.exception_handler(F.WebError)
    async def web_error(request: Request, exc: F.WebError):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.get("/api/config")
    def config():
        return {"extensions": list(cfg.extensions), "template_extensions": list(F.TEMPLATE_EXTENSIONS),
                "max_upload_mb": cfg.max_upload_mb, "auth_required": bool(cfg.token)}

    # ---------------------------------------------------------------- templates
    def template_path(name: str) -> Path:
        p = F.child(tdir, name)  # resolved: a symlink out of the template dir is refused here
        if not p.is_file() or p.suffix.lower() not in F.TEMPLATE_EXTENSIONS or p.name.startswith("."):
            raise F.WebError(404, f"no template named {name!r}")
        return p

    def store_template(up: UploadFile) -> Path:
        name = F.sanitize_name(up.filename or "", "template")
        ext = os.path.splitext(name)[1].lower()
        if ext not in F.TEMPLATE_EXTENSIONS:
            raise F.WebError(415, f"{name}: not a template type (allowed: {' '.join(F.TEMPLATE_EXTENSIONS)})")
        part = F.save_stream(up.file, tdir, ext, max_bytes)
        try:
            facts = F.media_facts(part)
            if "error" in facts or not facts.get("has_video"):
                raise F.WebError(415, f"{name}: not a readable video or image ({facts.get('error', 'no video stream')})")
            fp = F.content_fingerprint(part)
            for existing in list_template_files(tdir):  # same content already in the library: reuse it
                if existing.stat().st_size == part.stat().st_size and F.content_fingerprint(existing) == fp:
                    part.unlink(missing_ok=True)
                    return existing
            return F.commit(part, tdir, name)
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def unusable() -> dict[str, str]:
        """template fingerprint -> why it is unusable (the daemon's or the face check's verdict)."""
        if not (var / "ledger.sqlite3").exists():
            return {}
        with ledger() as db:
            return {fp: c["reason"] or "unusable" for fp, c in db.template_checks().items() if not c["usable"]}

    def described(paths) -> list[dict]:
        bad = unusable()
        out = []
        for p in paths:
            d = describe(p, checker)
            d["unusable"] = bad.get(F.content_fingerprint(p)) if bad else None
            out.append(d)
        return out

    @app.get("/api/templates")
    def templates():
        return {"templates": described(list_template_files(tdir))}

    @app.post("/api/templates", status_code=201)
    def upload_templates(files: list[UploadFile] = File(...)):
        tdir.mkdir(parents=True, exist_ok=True)
        return {"templates": described([store_template(up) for up in files])}

    @app.delete("/api/templates/{name}")
    def delete_template(name: str):
        p = template_path(name)
        with ledger() as db:  # a queued job would fail with "template not found": wait until it ran
            for r in db.recent_recordings(limit=HISTORY_LIMIT):
                if r.state in ("queued", "running") and any(
                        t.state in ("queued", "running") and Path(t.template_path).name == p.name
                        for t in db.tasks_for(r.id)):
                    raise F.WebError(409, f"{p.name} is still used by a queued job ({r.name})")
        p.unlink()
        return {"deleted": p.name}

    @app.get("/api/templates/{name}/thumb")
    def template_thumb(name: str):
        return thumb_response(template_path(name))

    def thumb_response(path: Path):
        t = F.thumbnail(path, thumbs)
        if t is None:
            raise F.WebError(404, "no picture in this file")
        return FileResponse(t, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})  # revalidated by ETag

    # ---------------------------------------------------------------- submit
    @app.post("/api/submit", status_code=201)
    def submit(recording: UploadFile = File(...), templates: list[str] = Form(default=[]),
               template_files: list[UploadFile] = File(default=[])):
        from heygem_watch.ledger import fingerprint_file

        tpl_paths = [template_path(n) for n in templates if n]
        tdir.mkdir(parents=True, exist_ok=True)
        tpl_paths += [store_template(up) for up in template_files if up.filename]
        tpl_paths = list(dict.fromkeys(tpl_paths))
        if not tpl_paths:
            raise F.WebError(400, "choose or upload at least one template")
        bad = unusable()
        for p in tpl_paths:
            if F.content_fingerprint(p) in bad:
                raise F.WebError(422, f"template {p.name} is unusable: {bad[F.content_fingerprint(p)]}")
        name = F.sanitize_name(recording.filename or "", "recording")
        ext = os.path.splitext(name)[1].lower()
        if ext not in cfg.extensions:
            raise F.WebError(415, f"{name}: file type {ext or '(none)'} not accepted (allowed: {' '.join(cfg.extensions)})")
        day = time.strftime("%Y-%m-%d")  # the ledger's day: local date of arrival
        part = F.save_stream(recording.file, uploads / day, ext, max_bytes)
        try:
            facts = F.media_facts(part)
            if "error" in facts:
                raise F.WebError(415, f"{name}: {facts['error']}")
            if not facts.get("has_audio"):
                raise F.WebError(415, f"{name}: contains no audio stream (a recording needs speech)")
            fp = fingerprint_file(part)
            tpls = [(str(p), F.content_fingerprint(p)) for p in tpl_paths]
            batch = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}" if len(tpls) > 1 else None
            with submit_lock, ledger() as db:
                prior = db.find_by_fingerprint(fp)
                if prior is not None and prior.state != "failed":
                    # known content: the templates it lacks (and failed ones) are queued for it; the upload is kept
                    # as its source only when it is finished (else its own source is still waiting)
                    final = F.commit(part, uploads / day, name)
                    res = db.add_recording(final, fp, final.stat().st_size, tpls, source="web", batch=batch,
                                           output_dir=prior.output_dir, day=day)
                    if not (res.task_ids and res.prev_state in ("done", "partial")):
                        final.unlink(missing_ok=True)
                        final = Path(prior.source_path)
                else:  # new, or a failed one dropped again to retry
                    final = F.commit(part, uploads / day, name)
                    out_dir = unique_dir(db, outputs / day / final.stem)
                    res = db.add_recording(final, fp, final.stat().st_size, tpls, source="web", batch=batch,
                                           output_dir=out_dir, day=day)
                    if res.duplicate_of is not None:  # another process (the watcher) won the race
                        final.unlink(missing_ok=True)
                        final = Path(db.recording(res.duplicate_of).source_path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        snapshot.invalidate()
        body = {"recording_id": res.recording_id, "duplicate_of": res.duplicate_of, "task_ids": list(res.task_ids),
                "batch": batch if res.duplicate_of is None else None, "templates": [p.name for p in tpl_paths], "name": final.name}
        with ledger() as db:
            body["renderer"] = db.renderer_status()
            # what this call queued, and (for known content) what the recording already had
            names = {t.id: t.template_name for t in db.tasks_for(res.recording_id)}
        body["queued"] = [names[i] for i in res.task_ids if i in names]
        body["existing"] = list(res.existing)
        if res.task_ids and not body["renderer"]["running"]:
            since = body["renderer"]["since"]
            when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
            body["note"] = (f"the renderer (heygem-watch run) is not running{when}: this job waits in the queue "
                            "until it is started")
        return JSONResponse(body, 200 if res.duplicate_of is not None else 201)

    def requeued(rid: int, what) -> dict:
        """what(ledger) (a heygem_watch.requeue call) for a known recording: 404 if unknown, 409 with the reason
        when nothing can be queued."""
        from heygem_watch.requeue import RequeueError

        with ledger() as db:
            get_recording(db, rid)
            try:
                res = what(db)
            except RequeueError as exc:
                raise F.WebError(409, str(exc)) from None
        snapshot.invalidate()
        return res.as_dict()

    @app.post("/api/recordings/{rid}/retry")
    def retry_recording(rid: int):
        """Queue the failed tasks of a recording again (done ones are kept)."""
        from heygem_watch import requeue

        return requeued(rid, lambda db: requeue.retry(db, rid))

    @app.post("/api/recordings/{rid}/rerun")
    def rerun_recording(rid: int, templates: list[str] = Form(...)):
        """Render a known recording with library templates it does not have yet (same folder and manifest)."""
        from heygem_watch import requeue

        paths = [template_path(n) for n in templates if n]
        if not paths:
            raise F.WebError(400, "choose at least one template")
        return requeued(rid, lambda db: requeue.rerun(db, rid, paths, tdir))

    def unique_dir(db, base: Path) -> Path:
        out, i = base, 1
        while out.exists() or db.output_dir_in_use(out):
            i += 1
            out = base.with_name(f"{base.name}-{i}")
        return out

    # ---------------------------------------------------------------- status / history
    def task_view(db, t) -> dict:
        d = _jsonable(t)
        if t.state == "queued":
            d["position"] = db.queue_position(t.id)
        out = t.output_path and Path(t.output_path)
        d["output_name"] = out.name if out else None
        d["has_output"] = bool(out and t.state == "done" and out.exists() and safe_read(out, quiet=True))
        if d["has_output"]:
            d["media"] = F.media_facts(out)
        return d

    def recording_view(db, r, with_log: bool = False) -> dict:
        d = _jsonable(r)
        tasks = db.tasks_for(r.id)
        d["tasks"] = [task_view(db, t) for t in tasks]
        d["n_tasks"] = len(tasks)
        d["n_done"] = sum(t.state == "done" for t in tasks)
        d["n_failed"] = sum(t.state == "failed" for t in tasks)
        running = [t for t in tasks if t.state == "running"]
        d["running_template"] = running[0].template_name if running else None
        if r.state in ("failed", "partial") or d["n_failed"]:
            d["error_json"] = failure_report(r)
            if with_log:
                d["log"] = log_lines(r)
        return d

    def failure_report(r) -> dict | None:
        stem = Path(r.name).stem
        cands = [Path(r.final_path).with_name(Path(r.final_path).name + ".error.json")] if r.final_path else []
        for day in sorted({r.day, time.strftime("%Y-%m-%d")} - {None}):
            cands += [failed / day / f"{r.name}.error.json", failed / day / f"{stem}.error.json"]
        for cand in cands:
            try:
                if cand.is_file():
                    return F.read_json(F.within(cand, [failed]))
            except F.WebError:
                continue
        return None

    def log_lines(r) -> list[str]:
        for stem in dict.fromkeys([Path(r.name).stem, Path(r.output_dir or r.name).name]):
            p = logs / str(r.day) / f"{stem}.jsonl"
            if p.is_file():
                return F.tail_lines(F.within(p, [logs]), LOG_LINES)
        return []

    def safe_read(path: Path, quiet: bool = False) -> Path | None:
        """A ledger path (output, source) that may be served: it exists and lies in var/ or the template dir."""
        try:
            return F.within(path, [var, tdir])
        except F.WebError:
            if quiet:
                return None
            raise

    @app.get("/api/status")
    async def status():
        return Response(await snapshot.get(), media_type="application/json")

    @app.get("/api/recordings")
    async def recordings(limit: int = 50):
        limit = max(1, min(limit, HISTORY_LIMIT))
        body = await snapshot.cached(f"recordings:{limit}", lambda: history(limit), HISTORY_MAX_AGE_S)
        return Response(body, media_type="application/json")

    def history(limit: int) -> dict:
        with ledger() as db:
            days: dict[str, list] = {}
            gone = deleted_ids(db)
            for r in db.recent_recordings(limit=limit):
                if r.id in gone:
                    continue
                days.setdefault(str(r.day), []).append(recording_view(db, r))
        return {"days": [{"day": d, "recordings": rs} for d, rs in sorted(days.items(), reverse=True)]}

    def deleted_ids(db) -> set[int]:
        return {e["recording_id"] for e in db.events(DELETED_EVENT, limit=100_000)}

    def get_recording(db, rid: int):
        try:
            r = db.recording(rid)
        except KeyError:
            raise F.WebError(404, f"no recording {rid}") from None
        if rid in deleted_ids(db):
            raise F.WebError(404, f"the results of recording {rid} were deleted")
        return r

    @app.get("/api/recordings/{rid}")
    def recording(rid: int):
        with ledger() as db:
            return recording_view(db, get_recording(db, rid), with_log=True)

    @app.get("/api/recordings/{rid}/log")
    def recording_log(rid: int):
        with ledger() as db:
            return {"lines": log_lines(get_recording(db, rid))}

    @app.get("/api/batches/{batch}")
    def batch(batch: str):
        with ledger() as db:
            rs = [recording_view(db, r) for r in db.recordings_in_batch(batch)]
        if not rs:
            raise F.WebError(404, f"no batch {batch!r}")
        return {"batch": batch, "recordings": rs}

    def task_output(db, tid: int) -> Path:
        try:
            t = db.task(tid)
        except KeyError:
            raise F.WebError(404, f"no task {tid}") from None
        if t.state != "done" or not t.output_path:
            raise F.WebError(404, f"task {tid} has no result")
        p = safe_read(Path(t.output_path))
        if not p.is_file():
            raise F.WebError(404, f"the result of task {tid} was deleted")
        return p

    @app.get("/api/tasks/{tid}/video")
    def task_video(tid: int, download: bool = False):
        with ledger() as db:
            p = task_output(db, tid)
        disp = "attachment" if download else "inline"
        return FileResponse(p, media_type="video/mp4", content_disposition_type=disp, filename=p.name)

    @app.get("/api/tasks/{tid}/thumb")
    def task_thumb(tid: int):
        with ledger() as db:
            p = task_output(db, tid)
        return thumb_response(p)

    def zip_entries(db, r) -> list[tuple[Path, str]]:
        entries, seen = [], set()
        for t in db.tasks_for(r.id):
            if t.state == "done" and t.output_path:
                p = safe_read(Path(t.output_path), quiet=True)
                if p and p.is_file() and p.name not in seen:
                    seen.add(p.name)
                    entries.append((p, p.name))
        if r.output_dir:
            man = Path(r.output_dir) / "manifest.json"
            if man.is_file() and safe_read(man, quiet=True):
                entries.append((F.within(man, [var]), "manifest.json"))
        return entries

    @app.get("/api/recordings/{rid}/zip")
    def recording_zip(rid: int):
        with ledger() as db:
            r = get_recording(db, rid)
            entries = zip_entries(db, r)
        if not entries:
            raise F.WebError(404, f"recording {rid} has no results yet")
        fname = f"{Path(r.name).stem}.zip"
        headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(fname)}"}
        return StreamingResponse(F.zip_stream(entries), media_type="application/zip", headers=headers)

    @app.delete("/api/recordings/{rid}")
    def delete_recording(rid: int):
        with ledger() as db:
            r = get_recording(db, rid)
            tasks = db.tasks_for(r.id)
            if any(t.state in ("running", "queued") for t in tasks):
                raise F.WebError(409, "this recording is still being processed")
            removed = []
            for t in tasks:
                p = t.output_path and safe_read(Path(t.output_path), quiet=True)
                if p and p.is_file() and F.within(p, [outputs]):
                    p.unlink()
                    removed.append(p.name)
            if r.output_dir:
                d = Path(r.output_dir)
                if d.is_dir() and safe_read(d, quiet=True) and F.within(d, [outputs]) != outputs.resolve():
                    shutil.rmtree(d)
            # the ledger row stays (the content is still known: dropping it again is a duplicate, not new work)
            db.add_event(r.id, DELETED_EVENT, files=removed)
        snapshot.invalidate()
        return {"deleted": rid, "files": removed}

    @app.get("/api/files/{rel:path}")
    def output_file(rel: str):
        """Any file under var/outputs by its relative path (as manifest.json lists them)."""
        p = F.within(outputs / rel, [outputs])
        if not p.is_file():
            raise F.WebError(404, "no such file")
        return FileResponse(p)

    @app.get("/")
    def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
