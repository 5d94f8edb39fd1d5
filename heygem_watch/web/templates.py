"""Template library for the dashboard: listing with media facts and the face check, run in the background.

The face check is the daemon's analysis (`template.load_template`, cached under var/cache/templates/<fingerprint>/)
with MediaPipe over every frame (a render tracks only the frames it shows and every 3rd after them), so checking a
template here also warms the daemon's cache. It runs in a
child process at low priority, one template at a time: MediaPipe holds the GIL, and in a thread it would freeze the
dashboard for seconds while the daemon renders. The listing shows "pending" until it is done.

    python -m heygem_watch.web.templates TEMPLATE CACHE_ROOT    prints the check as one JSON line
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

from heygem_watch.web.files import (PARTIAL_PREFIX, TEMPLATE_EXTENSIONS, WebError, content_fingerprint, media_facts,
                                    read_json, within)

FACE_CHECK_TIMEOUT_S = 1800  # a 10-minute template takes minutes on 2 busy cores
CHILD_NICE = 10  # the check yields the CPU to the daemon's rendering
FACE_OK = 0.9  # share of frames with a face at which the template counts as good (same idea as `heygem-watch check`)
RESULTS_DIR = "web-face"  # under var/cache: one JSON per template fingerprint


def list_template_files(template_dir: Path) -> list[Path]:
    """Template files directly in template_dir (no sub-folders, no dot-files, known extensions), by name."""
    if not template_dir.is_dir():
        return []
    out = []
    for p in template_dir.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in TEMPLATE_EXTENSIONS or not p.is_file():
            continue
        try:  # a symlink out of the folder is not shown: the dashboard serves nothing from outside it
            within(p, [template_dir])
        except WebError:
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.name.lower())


class FaceChecker:
    """Background face analysis of templates; results as JSON under cache_root/RESULTS_DIR/<fingerprint>.json."""

    def __init__(self, cache_root: Path, ledger_path: Path | None = None, max_side: int = 0):
        self.cache_root = Path(cache_root)
        self.max_side = max_side  # the daemon's HEYGEM_MAX_SIDE: its renders then find this analysis cached
        self.ledger_path = ledger_path  # the verdict goes into the ledger too: the daemon's fan-out skips a bad one
        self.results = self.cache_root / RESULTS_DIR
        self._queue: queue.Queue[tuple[Path, str]] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def result(self, path: Path) -> dict:
        """{state: done|error|pending|unavailable, face_fraction?, ok?, message?}; queues the analysis if needed."""
        fp = content_fingerprint(path)
        res = read_json(self.results / f"{fp}.json")
        if res is not None:
            return res
        with self._lock:
            if fp not in self._pending:
                self._pending.add(fp)
                self._queue.put((path, fp))
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, daemon=True, name="web-face-check")
                    self._thread.start()
        return {"state": "pending", "message": "face check running"}

    def _run(self) -> None:
        while True:
            try:
                path, fp = self._queue.get(timeout=5)
            except queue.Empty:
                return  # the next result() call starts a new thread
            try:
                res = self._analyse(path)
            except Exception as exc:  # a crash in analysis must not kill the checker
                res = {"state": "error", "message": f"{type(exc).__name__}: {exc}"}
            if res.get("state") != "unavailable":
                self.results.mkdir(parents=True, exist_ok=True)
                tmp = self.results / f"{PARTIAL_PREFIX}{fp}.json"
                tmp.write_text(json.dumps(res))
                os.replace(tmp, self.results / f"{fp}.json")
                self._record(path, fp, res)
            with self._lock:
                self._pending.discard(fp)

    def _record(self, path: Path, fp: str, res: dict) -> None:
        """A template that cannot be used (no face, unreadable) is marked so in the ledger, as the daemon does."""
        if self.ledger_path is None or "ok" not in res:  # a crash or timeout says nothing about the template
            return
        from heygem_watch.ledger import Ledger

        try:
            with Ledger(self.ledger_path) as db:
                usable = res.get("state") == "done"
                db.set_template_check(fp, path, usable, None if usable else res.get("message"))
        except Exception:  # noqa: BLE001 - the listing still shows the verdict
            pass

    def _analyse(self, path: Path) -> dict:
        cmd = [sys.executable, "-m", "heygem_watch.web.templates", str(path), str(self.cache_root), str(self.max_side)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FACE_CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"state": "error", "message": f"face check took longer than {FACE_CHECK_TIMEOUT_S} s"}
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"state": "error", "message": f"face check crashed (exit {proc.returncode}): {tail}"}


def face_check(path: Path, cache_root: Path, max_side: int = 0) -> dict:
    """The check itself (runs in the child): {state, ok, face_fraction, message}."""
    try:
        from heygem_watch.media import MediaError
        from heygem_watch.template import load_template
    except ImportError as exc:
        return {"state": "unavailable", "message": f"analysis pending (template module not available: {exc})"}
    try:
        tpl = load_template(path, cache_root, max_side=max_side)
    except MediaError as exc:
        return {"state": "error", "ok": False, "face_fraction": 0.0, "message": exc.reason}
    frac = round(tpl.face_fraction, 3)
    ok = frac >= FACE_OK
    msg = f"face in {frac:.0%} of frames" + ("" if ok else " (frames without a face are pasted back unchanged)")
    return {"state": "done", "ok": ok, "face_fraction": frac, "message": msg}


def describe(path: Path, checker: FaceChecker | None) -> dict:
    """One library entry: name, size, facts (resolution, fps, duration) and the face check."""
    facts = media_facts(path)
    entry = {"name": path.name, "size": path.stat().st_size, **facts}
    entry["face"] = checker.result(path) if checker is not None and "error" not in facts else \
        {"state": "error", "message": facts.get("error", "not checked")}
    return entry


if __name__ == "__main__":
    os.nice(CHILD_NICE)
    print(json.dumps(face_check(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)),
          flush=True)
