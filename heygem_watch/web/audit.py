"""The dashboard's log: one event per request that changes something (`web_request`: uploads, submits, deletions,
logins) and per refusal (`web_refused`, 4xx; `web_error`, 5xx), each with who (client address), what (method,
path) and the result (the answer's ids and names, or the refusal's reason). Reads that succeed are not logged:
every open page asks for the status once a second.

A page left open without its token is refused once a second for as long as it stays open: the same refusal (client,
method, path, status) is logged at most once per REPEAT_S, with how many were left out since (`repeated`).
Plain ASGI middleware, outermost, so the security guard's refusals are seen too.
"""
from __future__ import annotations

import json
import time

from heygem_watch.logs import get_logger

EVENT_OK, EVENT_REFUSED, EVENT_ERROR = "web_request", "web_refused", "web_error"
READ_METHODS = ("GET", "HEAD", "OPTIONS")
BODY_KEEP = 64 << 10  # bytes of an answer kept to take the result from (answers that matter are small JSON)
RESULT_KEYS = ("recording_id", "duplicate_of", "task_ids", "batch", "name", "templates", "deleted", "files", "note")
REPEAT_S = 60.0
REPEAT_TABLE_MAX = 10_000  # distinct refusals remembered; the table is emptied beyond (a scan, not a flood)


def _result(body: bytes) -> dict:
    """The answer's ids and names ({'error': ...} for a refusal), lists of templates reduced to their names."""
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out = {k: data[k] for k in RESULT_KEYS if k in data}
    if isinstance(out.get("templates"), list):
        out["templates"] = [t.get("name") if isinstance(t, dict) else t for t in out["templates"]]
    if "error" in data:
        out["reason"] = data["error"]
    elif isinstance(data.get("detail"), list):  # FastAPI's validation errors
        out["reason"] = "; ".join(str(d.get("msg")) for d in data["detail"] if isinstance(d, dict))
    return out


class AuditLog:
    def __init__(self, app):
        self.app = app
        self._seen: dict[tuple, list] = {}  # refusal key -> [last logged (monotonic), left out since]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope["method"]
        state = {"status": 500, "body": bytearray()}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and (method not in READ_METHODS or state["status"] >= 400):
                if len(state["body"]) < BODY_KEEP:
                    state["body"] += message.get("body", b"")[:BODY_KEEP - len(state["body"])]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            self._emit(scope, 500, {"reason": f"{type(exc).__name__}: {exc}"})
            raise
        status = state["status"]
        if method not in READ_METHODS or status >= 400:
            self._emit(scope, status, _result(bytes(state["body"])))

    def _emit(self, scope, status: int, result: dict) -> None:
        log = get_logger()
        client = (scope.get("client") or ("?",))[0]
        what = {"client": client, "method": scope["method"], "path": scope["path"], "status": status}
        if status < 400:
            log.info(EVENT_OK, **what, **result)
            return
        if status >= 500:
            log.error(EVENT_ERROR, **what, **result)
            return
        key = (client, scope["method"], scope["path"], status)
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < REPEAT_S:
            seen[1] += 1
            return
        if len(self._seen) >= REPEAT_TABLE_MAX:
            self._seen.clear()
        repeated = seen[1] if seen is not None else 0
        self._seen[key] = [now, 0]
        log.warning(EVENT_REFUSED, **what, **result, **({"repeated": repeated} if repeated else {}))
