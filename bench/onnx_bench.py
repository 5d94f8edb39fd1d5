#!/usr/bin/env python3
"""End-to-end speed of the ONNX engine at 1280x720 (issue 4): fp32 and int8 (and fp16 on a GPU).

A random-weight checkpoint of the exact public Wav2Lip layout is exported with the real export code (speed does not
depend on the weights), a 1280x720 25 fps template is made from the public-domain test photo, and the real pipeline
(`pipeline.run_task`: template frames -> engine -> x264 + AAC mux -> atomic rename) renders a speech-like
recording. Printed per precision: end-to-end fps (render wall time, template already analysed), model-only fps
(engine.infer on full batches), provider, batch size, peak RSS; on CUDA also peak VRAM and mean GPU utilisation
(nvidia-smi sampled every 0.2 s).

    .venv/bin/python bench/onnx_bench.py [--seconds 20] [--precisions fp32 int8] [--batch N] [--threads N]
Needs the export extra (torch + onnx). Exports are cached in --work.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

W, H, FPS = 1280, 720, Fraction(25)
TEMPLATE_FRAMES = 100  # 4 s, played ping-pong


def make_inputs(work: Path, seconds: float) -> tuple[Path, Path]:
    import cv2

    from tests import mediagen

    tpl, rec = work / "anchor720.mp4", work / f"speech{seconds:g}.wav"
    if not tpl.exists():
        photo = mediagen.face_photo()
        s = H / photo.shape[0]
        face = cv2.resize(photo, (int(photo.shape[1] * s), H), interpolation=cv2.INTER_AREA)

        def frames():
            for i in range(TEMPLATE_FRAMES):
                canvas = np.full((H, W, 3), (70, 80, 90), np.uint8)
                x0 = (W - face.shape[1]) // 2 + int(8 * np.sin(i / 9))
                canvas[:, x0:x0 + face.shape[1]] = face
                yield canvas

        mediagen.write_video(tpl, frames(), fps=FPS)
    if not rec.exists():
        mediagen.write_audio(rec, mediagen.speech_like(seconds))
    return tpl, rec


def make_models(work: Path, precisions: list[str]) -> dict[str, Path]:
    import torch

    from heygem_watch.engines.onnx import checkpoint as C
    from heygem_watch.engines.onnx import export as E

    ckpt = work / "random_wav2lip.pth"
    if not ckpt.exists():
        torch.manual_seed(0)
        m = C.build_wav2lip()
        C.randomise_batchnorm(m)
        torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, ckpt)
    out = {}
    for p in precisions:
        path = work / f"wav2lip_{p}.onnx"
        if not (path.exists() and E.sidecar_path(path).exists()):
            t0 = time.monotonic()
            E.export_checkpoint(ckpt, path, precision=p, log=lambda s: print("  " + s))
            print(f"  export {p}: {time.monotonic() - t0:.1f} s")
        out[p] = path
    return out


class GpuSampler:
    """Peak memory.used and mean utilization.gpu of GPU 0 from nvidia-smi while running."""

    def __init__(self):
        self.exe = shutil.which("nvidia-smi")
        self.util: list[float] = []
        self.mem: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run([self.exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,"
                                      "nounits", "-i", "0"], capture_output=True, text=True, timeout=2).stdout
                u, m = out.strip().split(",")
                self.util.append(float(u))
                self.mem.append(float(m))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def __enter__(self):
        if self.exe:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.exe:
            self._t.join()

    def summary(self) -> dict:
        if not self.util:
            return {}
        return {"gpu_util_mean_pct": round(float(np.mean(self.util)), 1), "vram_peak_mib": max(self.mem)}


def bench_one(precision: str, model: Path, tpl_path: Path, rec: Path, work: Path, args) -> dict:
    from heygem_watch.engines.onnx.engine import OnnxEngine
    from heygem_watch.engines.onnx.export import random_inputs
    from heygem_watch.logs import configure
    from heygem_watch.pipeline import RecordingJob, run_task
    from heygem_watch.template import load_template

    configure("json", "warning")
    opts = {k: v for k, v in (("batch_size", args.batch), ("threads", args.threads), ("provider", args.provider)) if v}
    eng = OnnxEngine(model, **opts)
    job = RecordingJob.prepare(rec, work / f"job-{precision}")
    load_template(tpl_path, work / "cache")  # analysed once, outside the timing
    feeds = random_inputs(eng.batch_size, 0)
    eng.infer(feeds["audio"], feeds["face"])  # warm-up (CUDA/cuDNN algorithm search, allocations)
    counts = [0] * eng.workers
    t0 = time.monotonic()

    def spin(w):  # the engine's own concurrency: `workers` runs side by side
        while time.monotonic() - t0 < args.model_seconds:
            eng.infer(feeds["audio"], feeds["face"])
            counts[w] += len(feeds["audio"])

    ts = [threading.Thread(target=spin, args=(w,)) for w in range(eng.workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    model_fps = sum(counts) / (time.monotonic() - t0)
    out = work / f"out-{precision}.mp4"
    ru0, load0 = resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()[0]
    with GpuSampler() as gpu:
        res = run_task(job, tpl_path, eng, out, work / "tmp", work / "cache")
    ru1, load1 = resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()[0]
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    row = {"precision": precision, "provider": eng.provider, "batch": eng.batch_size, "workers": eng.workers,
           "frames": res.frames,
           "e2e_fps": round(res.frames / res.wall_s, 2), "model_fps": round(model_fps, 2),
           "wall_s": round(res.wall_s, 1), "oom_halvings": eng.oom_halvings,
           # CPU seconds this process used per output frame, and the fps that means on the cores of this machine
           # when nothing else runs (the honest figure on a shared box; compare e2e_fps with it)
           "cpu_ms_per_frame": round(1000 * cpu_s / res.frames, 1),
           "cpu_bound_fps": round((os.cpu_count() or 1) * res.frames / cpu_s, 2),
           "loadavg_before_after": [round(load0, 2), round(load1, 2)]}
    row.update(gpu.summary())
    job.cleanup()
    eng.close()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/heygem-onnx-bench"))
    ap.add_argument("--seconds", type=float, default=20.0, help="recording length")
    ap.add_argument("--precisions", nargs="+", default=None, help="default: fp32 int8 (+ fp16 with CUDA)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--provider", default=None, help="auto | cpu | cuda | tensorrt")
    ap.add_argument("--model-seconds", type=float, default=8.0, help="time spent on the model-only measurement")
    args = ap.parse_args()
    import onnxruntime as ort

    args.work.mkdir(parents=True, exist_ok=True)
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    precisions = args.precisions or (["fp32", "fp16", "int8"] if gpu else ["fp32", "int8"])
    print(f"onnxruntime {ort.__version__} providers {ort.get_available_providers()}; {os.cpu_count()} CPU cores; "
          f"{W}x{H} @ {FPS} fps, recording {args.seconds:g} s")
    models = make_models(args.work, precisions)
    tpl, rec = make_inputs(args.work, args.seconds)
    rows = []
    for p in precisions:
        row = bench_one(p, models[p], tpl, rec, args.work, args)
        rows.append(row)
        print(json.dumps(row))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"{'precision':<10}{'provider':<24}{'batch':>6}{'e2e fps':>9}{'model fps':>11}{'cpu-bound fps':>15}")
    for r in rows:
        print(f"{r['precision']:<10}{r['provider']:<24}{r['batch']:>6}{r['e2e_fps']:>9}{r['model_fps']:>11}"
              f"{r['cpu_bound_fps']:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
