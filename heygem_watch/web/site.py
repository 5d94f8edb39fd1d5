"""What the dashboard's route groups (intake.py, results.py) share for one var/ folder and template folder: the
folders, the ledger, the status snapshot to invalidate after a change, and the lookups both groups answer with.

Deleting a recording's results leaves its ledger row and marks it with DELETED_EVENT; get_recording treats a
marked one as gone, so every lookup by id goes through it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from fastapi.responses import FileResponse

from heygem_watch.web import files as F
from heygem_watch.web.status import StatusSnapshot
from heygem_watch.web.templates import FaceChecker

HISTORY_LIMIT = 200  # recordings shown in history at most
DELETED_EVENT = "web_deleted"  # ledger event marking a recording whose results were deleted from the dashboard


class Site:
    """The app's folders and shared lookups (create_app makes one; the route groups take it)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.var = var = cfg.var_dir.resolve()
        self.tdir = cfg.template_dir.resolve()
        self.uploads, self.outputs = var / "uploads", var / "outputs"
        self.failed, self.logs = var / "failed", var / "logs"
        self.thumbs = var / "cache" / "web-thumbs"
        self.db_path = var / "ledger.sqlite3"
        self.checker = FaceChecker(var / "cache", ledger_path=self.db_path, max_side=cfg.max_side) \
            if cfg.face_check else None
        self.max_bytes = cfg.max_upload_mb << 20
        self.snapshot = StatusSnapshot(self.db_path)

    @contextmanager
    def ledger(self):
        from heygem_watch.ledger import Ledger

        db = Ledger(self.db_path)
        try:
            yield db
        finally:
            db.close()

    def deleted_ids(self, db) -> set[int]:
        return {e["recording_id"] for e in db.events(DELETED_EVENT, limit=100_000)}

    def get_recording(self, db, rid: int):
        try:
            r = db.recording(rid)
        except KeyError:
            raise F.WebError(404, f"no recording {rid}") from None
        if rid in self.deleted_ids(db):
            raise F.WebError(404, f"the results of recording {rid} were deleted")
        return r

    def thumb_response(self, path: Path):
        t = F.thumbnail(path, self.thumbs)
        if t is None:
            raise F.WebError(404, "no picture in this file")
        return FileResponse(t, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})  # revalidated by ETag
