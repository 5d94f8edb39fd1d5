"""Who may talk to the dashboard. One middleware, checked before any route:

- no token configured: only loopback Host names are answered (a page on another site that rebinds its DNS name to
  127.0.0.1 gets 403), and the bind check in server.py keeps the socket on loopback;
- token configured: every /api/ call needs it, as `X-HeyGem-Token: <token>`, `Authorization: Bearer <token>`, or
  the HttpOnly cookie /api/login sets (so <video> and download links work in the page);
- any write (POST, DELETE) carrying an Origin from another site is refused (cross-site form posts);
- a declared body larger than the upload limit is refused before it is read.
"""
from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import FastAPI, Form, Request
from fastapi.responses import JSONResponse

TOKEN_HEADER = "X-HeyGem-Token"
TOKEN_COOKIE = "heygem_token"
COOKIE_MAX_AGE_S = 30 * 86400
FORM_SLACK = 4 << 20  # bytes allowed beyond the upload limit for the form's other fields and multipart framing
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
OPEN_PATHS = ("/api/login", "/api/auth")  # reachable without the token (to obtain it)


def host_name(host: str) -> str:
    """'127.0.0.1:7860' -> '127.0.0.1', '[::1]:7860' -> '[::1]'."""
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())  # constant time


def presented_token(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE) or ""


class Guard:
    """The checks above as plain ASGI middleware (Starlette's BaseHTTPMiddleware costs a quarter of a status request)."""

    def __init__(self, app, token: str | None, max_bytes: int):
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(Request(scope))
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        token = self.token
        host = request.headers.get("host", "")
        if not token and host_name(host) not in LOOPBACK_HOSTS:
            return JSONResponse({"error": "this server only answers on 127.0.0.1 (set HEYGEM_WEB_TOKEN)"}, 403)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host:
            return JSONResponse({"error": "cross-site request refused"}, 403)
        cl = request.headers.get("content-length")
        if cl and cl.isdigit() and int(cl) > self.max_bytes + FORM_SLACK:
            return JSONResponse({"error": f"upload larger than the limit of {self.max_bytes >> 20} MB"}, 413)
        path = request.url.path
        if token and path.startswith("/api/") and path not in OPEN_PATHS and not same(presented_token(request), token):
            return JSONResponse({"error": "token required", "auth": True}, 401)
        return None


def install(app: FastAPI, token: str | None, max_bytes: int) -> None:
    """Add the guard middleware and the /api/auth, /api/login routes."""
    app.add_middleware(Guard, token=token, max_bytes=max_bytes)

    @app.get("/api/auth")
    def auth_state(request: Request):
        return {"required": bool(token), "ok": not token or same(presented_token(request), token)}

    @app.post("/api/login")
    def login(token_given: str = Form(..., alias="token")):
        if not token or not same(token_given, token):
            return JSONResponse({"error": "wrong token"}, 401)
        resp = JSONResponse({"ok": True})
        resp.set_cookie(TOKEN_COOKIE, token_given, httponly=True, samesite="strict", max_age=COOKIE_MAX_AGE_S)
        return resp
