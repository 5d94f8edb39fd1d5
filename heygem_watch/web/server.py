"""`heygem-watch web`: the dashboard's own process, beside `heygem-watch run`.

Binds to 127.0.0.1 by default. Any other address needs HEYGEM_WEB_TOKEN (the server refuses to start without it),
because the dashboard can read results and start jobs.
"""
from __future__ import annotations

import ipaddress
import sys
import tempfile

from heygem_watch.web.api import WebConfig, create_app
from heygem_watch.web.files import sweep_partials

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # the port users of Gradio-style AI tools expect
MIN_TOKEN_LEN = 12  # shorter tokens are guessable over a LAN
SPOOL_DIR = "web-spool"  # under var/tmp


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> str | None:
    """None when (host, token) may serve; otherwise the reason to refuse, for people."""
    if token is not None and token and len(token) < MIN_TOKEN_LEN:
        return f"HEYGEM_WEB_TOKEN is too short ({len(token)} characters, need at least {MIN_TOKEN_LEN})"
    if not is_loopback(host) and not token:
        return (f"refusing to listen on {host}: binding anywhere but 127.0.0.1 requires HEYGEM_WEB_TOKEN "
                f"(set it in config.env; the page asks for it once)")
    return None


def cli_web(args, settings) -> int:
    """Run the dashboard until interrupted. args.host/args.port may be None (then settings.web_host/web_port)."""
    host = getattr(args, "host", None) or getattr(settings, "web_host", None) or DEFAULT_HOST
    port = int(getattr(args, "port", None) or getattr(settings, "web_port", None) or DEFAULT_PORT)
    cfg = WebConfig.from_settings(settings)
    reason = check_bind(host, cfg.token)
    if reason:
        print(f"heygem-watch web: {reason}", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print("heygem-watch web: the dashboard needs the 'web' extra: pip install 'heygem-watch[web]'", file=sys.stderr)
        return 2
    cfg.var_dir.mkdir(parents=True, exist_ok=True)
    cfg.template_dir.mkdir(parents=True, exist_ok=True)
    # the multipart parser spools uploads to a temporary file first: keep that on var/'s disk, not a small /tmp
    spool = cfg.var_dir / "tmp" / SPOOL_DIR
    spool.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(spool)
    sweep_partials([cfg.var_dir / "uploads", cfg.template_dir])
    from heygem_watch import logrelay
    from heygem_watch.logs import configure, get_logger

    # the daemon's logging: JSON lines (journald) or console; uvicorn's own messages and the face checker's native
    # libraries (MediaPipe) come out through it too
    fmt, level = getattr(settings, "log_format", "json"), getattr(settings, "log_level", "info")
    configure(fmt, level)
    logrelay.start(fmt, level)
    app = create_app(cfg)
    shown = f"[{host}]" if ":" in host else host
    get_logger().info("web_started", url=f"http://{shown}:{port}/", var=str(cfg.var_dir),
                      templates=str(cfg.template_dir), token_required=bool(cfg.token))
    try:
        # one worker: the app keeps per-process locks (double submit) and a background face checker
        uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning", access_log=False, log_config=None,
                    proxy_headers=False, server_header=False)
    finally:
        logrelay.stop()
    return 0
