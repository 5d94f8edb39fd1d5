#!/usr/bin/env python3
"""Months unattended, in minutes: does the daemon's memory stay flat recording after recording?

Starts `heygem-watch run` on a fresh var/ under --work with --templates templates (bench/throughput.py's: real
talking clips from ../shared/media scaled to 1280x720, else the tests' public-domain photo) and drops --recordings
distinct WAV recordings into incoming/, one at a time: each a 3-8 s slice of the speech in ../shared/media/audio
(else synthetic speech) at a random offset and gain (seeded: the same files every run). After each recording's
manifest says it is finished it reads the daemon's resident memory (VmRSS) and counts its open file descriptors
and threads. Prints them every tenth recording, then: recordings done / failed, the RSS after the first 10 %, at the half and at the end, the largest
RSS, and the growth over the second half as a least-squares slope in MB per 100 recordings (a leak shows there;
the first recordings fill caches and allocator pools), and the open files and threads at the start and at the
end (each must stay flat: a daemon that keeps one file open per recording runs out after ~1000). Nothing is committed; the work folder is left for a look.

    .venv/bin/python bench/soak.py [--recordings 200] [--templates 2] [--work /tmp/heygem-soak]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_template, speech  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.gen_media import write_wav  # noqa: E402

RATE = 16000
SLICE_S = (3.0, 8.0)
WAIT_S = 120.0  # longest a recording may take before the bench gives up


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def finished(var: Path, name: str) -> dict | None:
    """The recording's manifest once it is in a final state (done, partial or failed), else None."""
    for m in var.glob(f"outputs/*/{name}/manifest.json"):
        try:
            doc = json.loads(m.read_text())
        except (OSError, ValueError):  # being replaced right now
            return None
        if doc.get("state") in ("done", "partial", "failed"):
            return doc
    if list(var.glob(f"failed/*/{name}.wav")):
        return {"state": "failed", "templates": []}
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recordings", type=int, default=200)
    ap.add_argument("--templates", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/heygem-soak"))
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    shutil.rmtree(a.work / "var", ignore_errors=True)
    var = a.work / "var"
    for d in ("templates", "incoming"):
        (var / d).mkdir(parents=True)
    staging = a.work / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    for i in range(a.templates):
        shutil.copy(make_template(i, a.work / f"template_{i}.mp4"), var / "templates" / f"template_{i}.mp4")
    voice, rng = speech(RATE), np.random.default_rng(a.seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEYGEM_")}
    env.update(HEYGEM_VAR_DIR=str(var), HEYGEM_SETTLE_SECONDS="0.5", HEYGEM_LOG_FORMAT="json", PYTHONPATH=str(ROOT))
    log = open(a.work / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "heygem_watch", "run"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=a.work)
    rss, fds, tasks = [], [], []
    states, t0 = {"done": 0, "partial": 0, "failed": 0}, time.monotonic()
    try:
        deadline = time.monotonic() + 180
        while '"event": "ready"' not in (a.work / "daemon.log").read_text(errors="replace"):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not start: see {a.work / 'daemon.log'}")
            time.sleep(0.2)
        for i in range(a.recordings):
            n = int(rng.uniform(*SLICE_S) * RATE)
            start = int(rng.integers(0, max(1, len(voice) - n)))
            name = f"soak_{i:04d}"
            write_wav(staging / f"{name}.wav", voice[start:start + n] * rng.uniform(0.4, 1.0))
            os.replace(staging / f"{name}.wav", var / "incoming" / f"{name}.wav")  # whole file at once
            deadline = time.monotonic() + WAIT_S
            while (doc := finished(var, name)) is None:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{name} not finished (daemon exit code {daemon.poll()}): see {a.work}")
                time.sleep(0.1)
            states[doc["state"]] += 1
            rss.append(rss_mb(daemon.pid))
            fds.append(open_files(daemon.pid))
            tasks.append(threads(daemon.pid))
            if i % 10 == 0 or i == a.recordings - 1:
                print(f"recording {i + 1:4d}  {doc['state']:8s} RSS {rss[-1]:7.1f} MB  open files {fds[-1]:3d}  "
                      f"threads {tasks[-1]:3d}  ({time.monotonic() - t0:6.0f} s)", flush=True)
    finally:
        daemon.send_signal(signal.SIGINT)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
    r = np.asarray(rss)
    half = len(r) // 2
    slope = np.polyfit(np.arange(half, len(r)), r[half:], 1)[0] * 100 if len(r) - half >= 2 else float("nan")
    print(f"{len(r)} recordings x {a.templates} templates in {time.monotonic() - t0:.0f} s: done {states['done']}, "
          f"partial {states['partial']}, failed {states['failed']}")
    print(f"RSS MB: after {max(1, len(r) // 10)} {r[max(1, len(r) // 10) - 1]:.0f}, after {half} {r[half - 1]:.0f}, "
          f"end {r[-1]:.0f}, largest {r.max():.0f}; second half {slope:+.1f} MB per 100 recordings")
    print(f"open files: after the first {fds[0]}, at the end {fds[-1]}, at most {max(fds)}; "
          f"threads: {tasks[0]}, {tasks[-1]}, at most {max(tasks)}")
    return 0 if states["done"] == len(r) else 1


if __name__ == "__main__":
    sys.exit(main())
