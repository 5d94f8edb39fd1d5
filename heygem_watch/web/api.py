"""The dashboard's FastAPI app: the JSON API (documented in docs/web.md) and the static page.

The web process only submits and reads: uploads and requeues come in through intake.py and are handed to the
ledger, the daemon (`heygem-watch run`) claims the tasks, and results.py shows what came out. Everything shown
comes from the ledger and var/, so a refresh loses nothing. This module puts the app together: the guard and the
audit log around it, the route groups, the page.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from heygem_watch.web import files as F
from heygem_watch.web import intake, results, security
from heygem_watch.web.audit import AuditLog
from heygem_watch.web.site import Site

STATIC_DIR = Path(__file__).parent / "static"
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
    max_side: int = 1920  # HEYGEM_MAX_SIDE: the face check analyses a template as renders will

    @classmethod
    def from_settings(cls, settings) -> "WebConfig":
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in
                     (getattr(settings, "extensions", None) or DEFAULT_EXTENSIONS))
        encoder = getattr(settings, "encoder", None)
        return cls(Path(settings.var_dir), Path(settings.template_dir), exts,
                   int(getattr(settings, "web_max_upload_mb", 2048) or 2048),
                   getattr(settings, "web_token", None) or None,
                   max_side=encoder.max_side if encoder is not None else 1920)


def create_app(cfg: WebConfig) -> FastAPI:
    """The app for one var/ folder and template folder."""
    site = Site(cfg)
    app = FastAPI(title="heygem-watch", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.cfg = cfg
    app.state.status = site.snapshot

    security.install(app, cfg.token, site.max_bytes)
    app.add_middleware(AuditLog)  # added last = outermost: sees the guard's refusals too

    @app.exception_handler(F.WebError)
    async def web_error(request: Request, exc: F.WebError):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.get("/api/config")
    def config():
        return {"extensions": list(cfg.extensions), "template_extensions": list(F.TEMPLATE_EXTENSIONS),
                "max_upload_mb": cfg.max_upload_mb, "auth_required": bool(cfg.token)}

    intake.add_routes(app, site)
    results.add_routes(app, site)

    @app.get("/")
    def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
