"""The web dashboard: its own process (`heygem-watch web`) beside the daemon, on the same ledger and var/ folders.

    server.py   cli_web: bind checks (token required off loopback), uvicorn
    api.py      FastAPI app: the JSON API the page uses (submit, status, history, downloads, templates)
    files.py    path confinement, name sanitising, atomic uploads, thumbnails, streamed ZIP
    status.py   /api/status and the history from snapshots rebuilt when the ledger changes
    audit.py    one log line per change and per refusal (who, what, result)
    static/     the page (plain HTML/JS/CSS, no build step)
"""
