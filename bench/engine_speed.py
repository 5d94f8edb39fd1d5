#!/usr/bin/env python3
"""Speed of the built-in engine's own stages (no encoding, no audio decoding).

    python bench/engine_speed.py [TEMPLATE ...] [--frames N] [--cache DIR]

Without a template it builds a 1280x720 25 fps one from the public-domain photo the tests use (the face fills
about a third of the height, like a presenter shot). Prints, per template:
  template_analysis   load_template (first run only) as the pipeline runs it: every frame decoded, FaceMesh on
                      the frames the output shows and every 3rd after them; ms per template frame
  mouth_analysis      BuiltinEngine.prepare_template (mouth library + mesh), ms per template frame
  read                Template.yuv(), ms per frame (what the pipeline pays per output frame)
  render              BuiltinEngine.render, ms per output frame, and how many times real time that is
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heygem_watch.engines.base import FrameJob  # noqa: E402
from heygem_watch.engines.builtin.engine import BuiltinEngine  # noqa: E402
from heygem_watch.pipeline import pingpong_index  # noqa: E402
from heygem_watch.template import load_template  # noqa: E402

SYNTH_SIZE = (1280, 720)
SYNTH_FRAMES = 100


class _Curve:
    """Syllable-like openness at 4 Hz with pauses: exercises closing, opening and synthesis."""

    rate = 100
    speech = True

    def sample(self, times):
        t = np.atleast_1d(np.asarray(times, np.float64))
        o = np.clip(np.sin(2 * np.pi * 4.0 * t), 0, 1) * (np.sin(2 * np.pi * 0.3 * t) > -0.3)
        w = 0.5 * np.sin(2 * np.pi * 0.7 * t)
        return o, w, np.zeros_like(o)


def synth_template(folder: Path) -> Path:
    import cv2

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import mediagen

    photo = mediagen.face_photo()
    w, h = SYNTH_SIZE
    scale = 0.8 * h / photo.shape[0]
    face = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)

    def frames():
        for i in range(SYNTH_FRAMES):
            canvas = np.full((h, w, 3), (120, 110, 100), np.uint8)
            x = (w - face.shape[1]) // 2 + int(10 * np.sin(i / 10))
            y = (h - face.shape[0]) // 2
            canvas[y:y + face.shape[0], x:x + face.shape[1]] = face
            yield canvas

    return mediagen.write_video(folder / "synthetic_1280x720.mp4", frames(), 25)


def bench(path: Path, cache: Path, n_out: int) -> None:
    from heygem_watch.template import _probe_fps

    t0 = time.perf_counter()
    tpl = load_template(path, cache, duration_s=n_out / float(_probe_fps(path)))
    t_load = time.perf_counter() - t0
    eng = BuiltinEngine()
    t0 = time.perf_counter()
    state = eng.prepare_template(tpl)
    t_prep = time.perf_counter() - t0
    fps = float(tpl.fps)
    t_read = 0.0
    jobs = []
    for i in range(n_out):
        k = pingpong_index(i, tpl.n_frames)
        a = time.perf_counter()
        yuv = tpl.yuv(k)  # as the pipeline hands frames to the engine (yuv420p; it converts only the mouth's box)
        t_read += time.perf_counter() - a
        jobs.append(FrameJob(i, i / fps, k, yuv=yuv))
    t0 = time.perf_counter()
    n = sum(1 for _ in eng.render(tpl, state, _Curve(), iter(jobs)))
    t_render = time.perf_counter() - t0
    ms = 1000 * t_render / n
    print(f"{path.name}: {tpl.width}x{tpl.height} @ {fps:.2f} fps, {tpl.n_frames} template frames, "
          f"{int(tpl.tracked.sum())} tracked{' (cached)' if tpl.cache_hit else ''}")
    print(f"  template_analysis {1000 * t_load / tpl.n_frames:7.2f} ms/frame  ({t_load:.2f} s)")
    print(f"  mouth_analysis    {1000 * t_prep / tpl.n_frames:7.2f} ms/frame  ({t_prep:.2f} s)")
    print(f"  read              {1000 * t_read / n_out:7.2f} ms/frame")
    print(f"  render            {ms:7.2f} ms/frame  = {1000 / ms / fps:.1f}x real time at {fps:.0f} fps "
          f"(render + read: {1000 / (ms + 1000 * t_read / n_out) / fps:.1f}x)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("templates", nargs="*", type=Path)
    ap.add_argument("--frames", type=int, default=150, help="output frames to render per template")
    ap.add_argument("--cache", type=Path, default=None, help="template cache folder (default: a fresh temp dir)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="engine-speed-") as tmp:
        cache = a.cache or Path(tmp) / "cache"
        paths = a.templates or [synth_template(Path(tmp))]
        for p in paths:
            bench(p, cache, a.frames)


if __name__ == "__main__":
    main()
