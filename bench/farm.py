#!/usr/bin/env python3
"""Render farm: wall time of the same tasks on 1 and on 2 workers, and what the head costs per task (issue #12).

For each worker count, a fresh farm on this machine: redis-server on a free loopback port, `heygem-watch run` with
HEYGEM_DISPATCH=celery, N `heygem-watch worker` processes (own template caches), the built-in engine. --tasks/2
generated recordings (--seconds long, distinct speech) are moved into incoming/ at once with 2 templates
(--size, the test photo face). Printed per run:
  wall          first recording dropped -> last output filed (settle wait and the head's audio extraction included)
  dispatch      per task, the head's send path: Celery id into the ledger + publish to Redis + mark sent (ms)
  head CPU      the head process's CPU time from ready to done (watch, fingerprint, audio extraction, send, poll,
                filing) / tasks (ms)
  filing lag    worker finished -> ledger says done (ms; the head polls every FARM_POLL_S)
  workers' CPU  CPU seconds of all worker processes during the run / wall: how many cores the renders kept busy
and the dispatch cost against a 10 s render (target < 50 ms and < 2 %).

    .venv/bin/python bench/farm.py [--tasks 8] [--seconds 10] [--size 1280x720] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heygem_watch.ledger import Ledger  # noqa: E402
from tests import gen_media  # noqa: E402
from tests.farmrig import Farm, wait_for  # noqa: E402
from tests.redisd import RedisServer  # noqa: E402

RENDER_REF_S = 10.0  # the yardstick: overhead < 2 % of a 10 s render


def _tree_cpu(procs) -> float:
    """CPU seconds (user + system) of these processes and their children (a worker's pool process renders)."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            root = psutil.Process(p.pid)
            for q in [root, *root.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run(work: Path, n_workers: int, recordings: list[Path], size: tuple[int, int]) -> dict:
    redis = RedisServer(work / "redis").start()
    farm = Farm(work, redis)
    try:
        for name in ("anna.png", "ben.png"):
            gen_media.face_png(farm.var / "templates" / name, size=size)
        workers = [farm.worker(f"w{k + 1}") for k in range(n_workers)]
        head = farm.head()
        import psutil

        cpu0 = psutil.Process(head.pid).cpu_times()  # start-up (imports, recovery) is not per-task work
        wcpu0 = _tree_cpu(workers)
        n_tasks = 2 * len(recordings)
        t0 = time.monotonic()
        for rec in recordings:
            shutil.copy(rec, farm.var / rec.name)
            (farm.var / rec.name).rename(farm.var / "incoming" / rec.name)
        ok = wait_for(lambda: (lambda ts: len(ts) == n_tasks and all(t.state in ("done", "failed") for t in ts))(
            farm.tasks()), 3600, 0.05)
        wall = time.monotonic() - t0
        cpu = psutil.Process(head.pid).cpu_times()
        workers_cpu = _tree_cpu(workers) - wcpu0
        tasks = farm.tasks()
        assert ok and all(t.state == "done" for t in tasks), [(t.id, t.state, t.error) for t in tasks]
        dispatch_ms = [json.loads(line)["dispatch_ms"] for line in farm.log("head").splitlines()
                       if '"task_dispatched"' in line]
        lag_ms = [1000 * (t.finished_at - t.timings["worker_finished_at"]) for t in tasks]
        renders = [t.timings["wall_s"] for t in tasks]
        per_worker: dict[str, int] = {}
        for t in tasks:
            per_worker[t.worker] = per_worker.get(t.worker, 0) + 1
        return {"workers": n_workers, "tasks": n_tasks, "wall_s": wall, "dispatch_ms": dispatch_ms,
                "head_cpu_ms_per_task": 1000 * (cpu.user + cpu.system - cpu0.user - cpu0.system) / n_tasks, "lag_ms": lag_ms,
                "render_s": renders, "per_worker": per_worker, "workers_cores": workers_cpu / wall}
    finally:
        farm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8, help="tasks per run (recordings x 2 templates); even")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each recording")
    ap.add_argument("--size", default="1280x720", help="template size WxH")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as d:
        d = Path(d)
        recs = [gen_media.write_av(d / f"show {i}.flv", args.seconds, audio=gen_media.speech(args.seconds, seed=i))
                for i in range(args.tasks // 2)]
        results = [run(d / f"run-{n}", n, recs, size) for n in args.workers]
    print(f"{args.tasks} tasks ({args.tasks // 2} recordings of {args.seconds:g} s x 2 templates {args.size}), "
          f"built-in engine, this machine's CPUs")
    print("| workers | wall | tasks per worker | mean render | workers' CPU use | dispatch per task (mean / max) "
          "| head CPU per task | filing lag (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        dm = r["dispatch_ms"]
        print(f"| {r['workers']} | {r['wall_s']:.1f} s | {'/'.join(str(v) for v in sorted(r['per_worker'].values()))} "
              f"| {statistics.mean(r['render_s']):.2f} s | {r['workers_cores']:.2f} cores "
              f"| {statistics.mean(dm):.1f} / {max(dm):.1f} ms "
              f"| {r['head_cpu_ms_per_task']:.0f} ms | {statistics.median(r['lag_ms']):.0f} ms |")
    if len(results) >= 2:
        print(f"speed-up {results[0]['workers']} -> {results[-1]['workers']} workers: "
              f"{results[0]['wall_s'] / results[-1]['wall_s']:.2f}x")
    dm = [x for r in results for x in r["dispatch_ms"]]
    mean = statistics.mean(dm)
    print(f"head dispatch overhead: {mean:.1f} ms per task (max {max(dm):.1f} ms) = "
          f"{100 * mean / 1000 / RENDER_REF_S:.3f} % of a {RENDER_REF_S:g} s render")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
