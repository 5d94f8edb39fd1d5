"""What comes in through the dashboard: the template library (list, upload, delete), recordings submitted with
their templates, and known recordings queued again (retry, rerun with more templates).

An upload is stored under var/uploads/ (hidden temporary name, then an atomic link to its final name),
fingerprinted and handed to the ledger; the daemon (`heygem-watch run`) claims the tasks.
"""
from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse

from heygem_watch.web import files as F
from heygem_watch.web.site import HISTORY_LIMIT, Site
from heygem_watch.web.templates import describe, list_template_files


def add_routes(app: FastAPI, site: Site) -> None:
    """/api/templates*, /api/submit and /api/recordings/{rid}/retry|rerun."""
    cfg, var, tdir, uploads, outputs = site.cfg, site.var, site.tdir, site.uploads, site.outputs
    ledger, snapshot, max_bytes = site.ledger, site.snapshot, site.max_bytes
    submit_lock = threading.Lock()  # fingerprint -> ledger in one step per process (double submit = one recording)

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
            d = describe(p, site.checker)
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
        return site.thumb_response(template_path(name))

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
            site.get_recording(db, rid)
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
