"""The web dashboard: its own process (`heygem-watch web`) beside the daemon, on the same ledger and var/ folders.

    server.py   cli_web: bind checks (token required off loopback), uvicorn
    api.py      FastAPI app: the guard, the audit log, the route groups below and the page
    site.py     what the route groups share: folders, ledger, status snapshot, recording lookups
    intake.py   what comes in: template library (list, upload, delete), submit, retry / rerun
    results.py  what comes out: status, history, recording and batch views, downloads, ZIP, deletion
    files.py    path confinement, name sanitising, atomic uploads, thumbnails, streamed ZIP
    status.py   /api/status and the history from snapshots rebuilt when the ledger changes
    audit.py    one log line per change and per refusal (who, what, result)
    static/     the page (plain HTML/JS/CSS, no build step)
"""
