"""What comes out, as the dashboard shows it: the status and the history, one recording or batch with its tasks,
failure report and log, the videos, thumbnails and ZIP to download, and deleting a recording's results.

Everything is read from the ledger and var/ on each request (the status and the history through status.py's
snapshot), so a refresh loses nothing. A path from the ledger is served only when it lies in var/ or the template
folder.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response, StreamingResponse

from heygem_watch.web import files as F
from heygem_watch.web.site import DELETED_EVENT, HISTORY_LIMIT, Site
from heygem_watch.web.status import HISTORY_MAX_AGE_S

LOG_LINES = 200  # lines of a recording's log returned with a failure


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


def add_routes(app: FastAPI, site: Site) -> None:
    """/api/status, /api/recordings*, /api/batches/{batch}, /api/tasks/{tid}/* and /api/files/*."""
    var, tdir, outputs, failed, logs = site.var, site.tdir, site.outputs, site.failed, site.logs
    ledger, snapshot, get_recording = site.ledger, site.snapshot, site.get_recording

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
            gone = site.deleted_ids(db)
            for r in db.recent_recordings(limit=limit):
                if r.id in gone:
                    continue
                days.setdefault(str(r.day), []).append(recording_view(db, r))
        return {"days": [{"day": d, "recordings": rs} for d, rs in sorted(days.items(), reverse=True)]}

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
        return site.thumb_response(p)

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
