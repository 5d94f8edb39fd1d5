#!/usr/bin/env python3
"""Latency of the dashboard's `GET /api/status` under many concurrent clients (issue 11, item 16).

Builds a ledger like a busy day's under a temporary var/ (--recordings recordings with --templates tasks each: most
done, --queued recordings waiting, one task rendering), starts the real `heygem-watch web` on a free loopback port,
then --clients clients, each on its own keep-alive connection, send --requests requests back to back (a closed loop:
every client asks again as soon as it has its answer, harsher than dashboards polling every 2 s). Prints p50, p95,
p99 and max latency and the throughput; stops by itself (bounded request count, --timeout). Loopback only.

    .venv/bin/python bench/web_status.py [--clients 200] [--requests 20] [--recordings 300] [--queued 20]
    .venv/bin/python bench/web_status.py --path "/api/recordings?limit=100"     # the history the page polls
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import dashboard  # noqa: E402 (`heygem-watch web` on a free loopback port)


def populate(var: Path, n_recordings: int, n_templates: int, n_queued: int) -> None:
    """A ledger with history: done recordings, then n_queued queued ones, the first of them rendering."""
    from heygem_watch.ledger import Ledger

    tdir = var / "templates"
    tdir.mkdir(parents=True, exist_ok=True)
    tpls = []
    for i in range(n_templates):
        p = tdir / f"videoretalking_presenter_{i:02d}.mp4"
        p.write_bytes(b"\0" * 64)  # status never opens templates; only their names are shown
        tpls.append((str(p), f"{i:040x}"))
    with Ledger(var / "ledger.sqlite3") as db:
        for r in range(n_recordings):
            res = db.add_recording(var / "incoming" / f"show {r:04d}.flv", f"{r + 1:040x}", 1000, tpls,
                                   output_dir=var / "outputs" / "2026-12-02" / f"show {r:04d}", day="2026-12-02")
            if r < n_recordings - n_queued:
                for tid in res.task_ids:
                    db.claim_next_task()
                    db.finish_task(tid, var / "outputs" / f"{tid}.mp4", {"fps": 30.0})
                db.set_recording_state(res.recording_id, "done")
        t = db.claim_next_task()
        if t is not None:
            db.update_progress(t.id, 120, 1500, 25.0, 55.0)


async def client(port: int, n: int, lat: list[float], errors: list[str], path: str = "/api/status") -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200") or not body.startswith(b"{"):
                errors.append(head.split(b"\r\n")[0].decode())
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()


async def load(port: int, clients: int, requests: int, timeout: float,
               path: str = "/api/status") -> tuple[list[float], list[str], float]:
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client(port, requests, lat, errors, path) for _ in range(clients))),
                           timeout)
    return lat, errors, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--recordings", type=int, default=300)
    ap.add_argument("--templates", type=int, default=3)
    ap.add_argument("--queued", type=int, default=20, help="recordings still waiting")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds for the whole load")
    ap.add_argument("--path", default="/api/status", help="the GET request to time (another API call, for comparison)")
    ap.add_argument("--port", type=int, default=None,
                    help="load a dashboard already listening on this loopback port (e.g. under py-spy) instead")
    args = ap.parse_args()
    if args.port:
        lat, errors, wall = asyncio.run(load(args.port, args.clients, args.requests, args.timeout, args.path))
        return report(args, lat, errors, wall)
    with tempfile.TemporaryDirectory(prefix="heygem-web-bench-") as tmp:
        var = Path(tmp) / "var"
        populate(var, args.recordings, args.templates, args.queued)
        with dashboard(Path(tmp), var) as url:  # its log: tmp/web.log, shown if it does not start
            port = int(url.rsplit(":", 1)[1])
            asyncio.run(load(port, 10, 5, 60, args.path))  # warm-up: imports, sqlite pages, first snapshot
            lat, errors, wall = asyncio.run(load(port, args.clients, args.requests, args.timeout, args.path))
    return report(args, lat, errors, wall)


def report(args, lat: list[float], errors: list[str], wall: float) -> int:
    ms = [x * 1000 for x in lat]
    print(json.dumps({"path": args.path, "clients": args.clients, "requests": len(ms), "errors": len(errors),
                      "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
                      "p99_ms": round(pct(ms, 99), 1), "max_ms": round(max(ms), 1),
                      "mean_ms": round(statistics.fmean(ms), 1), "req_per_s": round(len(ms) / wall, 1),
                      "recordings": args.recordings, "queued_tasks": args.queued * args.templates}))
    if errors:
        print("errors (first 5):", errors[:5], file=sys.stderr)
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
