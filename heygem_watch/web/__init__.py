"""The web dashboard: its own process (`heygem-watch web`) beside the daemon, on the same ledger and var/ folders.

    server.py   cli_web: bind checks (token required off loopback), uvicorn
    api.py      FastAPI app: the JSON API the page uses (submit, status, history, downloads, templates)
    files.py    path confinement, name sanitising, atomic uploads, thumbnails, streamed ZIP
    static/     the page (plain HTML/JS/CSS, no build step)
"""
