#!/usr/bin/env python3
"""How well does speech analysis alone predict a real speaker's mouth? (no rendering involved)

For every real talking clip (video + its own audio) it measures the speaker's mouth openness per video frame the way
the independent judge does (inner-lip gap 13-14 / inter-ocular 33-263, MediaPipe FaceMesh), computes
heygem_watch.speech.analyse_speech() from the clip's audio, samples `open` at the video frame times and prints:
  corr0     Pearson correlation at lag 0
  best_lag  lag in frames (+ = predicted late) maximising the correlation within +-8, and that correlation
and the pooled correlation (each clip z-scored, lag 0) like the judge's pooled_corr.

Real openness tracks are cached (npz) in --cache; they are computed with the judge's own code
(/work/shared/tools/lipsync_eval.py) in its venv, so this measures against exactly what the judge sees.

  .venv/bin/python bench/speech_eval.py [--media /work/shared/media] [--cache /tmp/speech_eval] [--plot DIR]
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heygem_watch.speech import SAMPLE_RATE, analyse_speech  # noqa: E402

TOOLS = "/work/shared/tools"
EVAL_PY = "/tmp/evalvenv/bin/python"
MAX_LAG = 8
MIN_FACE = 0.9  # clips where the judge finds a face in fewer frames are not talking-head clips
SKIP = ("videoretalking_face2_remux",)  # the same clip as videoretalking_face2, remuxed

_TRACK_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {tools!r})
import lipsync_eval as le
ts, o, w, f = le.mouth_track({src!r})
np.savez({dst!r}, ts=ts, open=o, width=w, found=f)
"""


class ArrayTrack:
    """Minimal in-memory AudioTrack (read / n_samples / sample_rate)."""

    def __init__(self, x: np.ndarray):
        self.x, self.n_samples, self.sample_rate = x.astype(np.float32), len(x), SAMPLE_RATE

    @property
    def duration(self) -> float:
        return self.n_samples / SAMPLE_RATE

    def read(self, start: int, count: int) -> np.ndarray:
        out = np.zeros(max(0, count), np.float32)
        lo, hi = max(0, start), min(self.n_samples, start + count)
        if hi > lo:
            out[lo - start: hi - start] = self.x[lo:hi]
        return out


def read_audio_16k(path: str) -> np.ndarray | None:
    """The clip's first audio stream decoded from its start, 16 kHz mono (as the judge's bench feeds it)."""
    import av

    with av.open(path) as c:
        if not c.streams.audio:
            return None
        res = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        out = []
        for fr in c.decode(c.streams.audio[0]):
            for r in res.resample(fr):
                out.append(r.to_ndarray().reshape(-1))
        for r in res.resample(None):
            out.append(r.to_ndarray().reshape(-1))
    return np.concatenate(out).astype(np.float32) if out else None


def real_track(path: str, cache: Path) -> dict:
    dst = cache / (Path(path).stem + ".npz")
    if not dst.exists():
        script = _TRACK_SCRIPT.format(tools=TOOLS, src=path, dst=str(dst))
        subprocess.run([EVAL_PY, "-c", script], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dict(np.load(dst))


def fill_nan(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64).copy()
    ok = ~np.isnan(a)
    if ok.sum() < 2:
        return np.zeros_like(a)
    idx = np.arange(len(a))
    a[~ok] = np.interp(idx[~ok], idx[ok], a[ok])
    return a


def lagged_corr(g: np.ndarray, r: np.ndarray, lag: int) -> float:
    """The judge's convention: + lag = generated (predicted) late."""
    a, b = (g[lag:], r[: len(r) - lag]) if lag >= 0 else (g[: len(g) + lag], r[-lag:])
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if n < 10 or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def clips(media: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(media, "templates", "*.mp4"))) + \
        sorted(glob.glob(os.path.join(media, "flv", "*.flv")))
    return [p for p in paths if Path(p).stem not in SKIP]


def evaluate(media: str, cache: Path, analyse=analyse_speech, plot_dir: Path | None = None, verbose=True,
             only: tuple[str, ...] = ()) -> dict:
    rows, G, R = [], [], []
    for path in clips(media):
        name = Path(path).stem
        if only and name not in only:
            continue
        audio = read_audio_16k(path)
        if audio is None:
            continue
        tr = real_track(path, cache)
        if tr["found"].mean() < MIN_FACE:
            continue
        real = fill_nan(tr["open"])
        t0 = time.perf_counter()
        curve = analyse(ArrayTrack(audio))
        dt = time.perf_counter() - t0
        pred = curve.sample(tr["ts"])[0].astype(np.float64)
        cors = {L: lagged_corr(pred, real, L) for L in range(-MAX_LAG, MAX_LAG + 1)}
        best = max(cors, key=cors.get)
        rows.append({"clip": name, "frames": len(real), "corr0": cors[0], "best_lag": best,
                     "corr_best": cors[best], "speed_x": len(audio) / SAMPLE_RATE / max(dt, 1e-9)})
        if pred.std() > 1e-9 and real.std() > 1e-9:
            G.append((pred - pred.mean()) / pred.std())
            R.append((real - real.mean()) / real.std())
        if plot_dir is not None:
            _plot(plot_dir / f"{name}.png", tr["ts"], real, pred, curve, name, cors[0])
    pooled = float(np.corrcoef(np.concatenate(G), np.concatenate(R))[0, 1]) if G else float("nan")
    summary = {"clips": len(rows), "pooled_corr": pooled,
               "mean_corr0": float(np.mean([r["corr0"] for r in rows])) if rows else float("nan"),
               "mean_abs_lag": float(np.mean([abs(r["best_lag"]) for r in rows])) if rows else float("nan"),
               "mean_lag": float(np.mean([r["best_lag"] for r in rows])) if rows else float("nan")}
    if verbose:
        for r in rows:
            print(f"{r['clip']:28s} frames {r['frames']:5d}  corr0 {r['corr0']:+.3f}  best_lag {r['best_lag']:+d} "
                  f"({r['corr_best']:+.3f})  analysis {r['speed_x']:.0f}x real time")
        print(f"pooled_corr {summary['pooled_corr']:.4f}  mean_corr0 {summary['mean_corr0']:.4f}  "
              f"mean_abs_lag {summary['mean_abs_lag']:.2f}  mean_lag {summary['mean_lag']:+.2f}  "
              f"clips {summary['clips']}")
    summary["rows"] = rows
    return summary


def _plot(png: Path, ts, real, pred, curve, name, c0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(14, 3.5))
    rz = (real - real.min()) / (np.ptp(real) + 1e-9)
    ax.plot(ts, rz, "k-", lw=1.2, label="real openness (judge, min-max)")
    ax.plot(ts, pred, "r-", lw=1.0, label="predicted open")
    t100 = np.arange(len(curve.open)) / curve.rate
    ax.fill_between(t100, 0, curve.closure * 0.3, color="b", alpha=0.3, label="closure")
    ax.plot(t100, curve.speech * 1.05, "g:", lw=0.8, label="speech")
    ax.set_title(f"{name}  corr0 {c0:+.3f}")
    ax.set_xlabel("s")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--media", default="/work/shared/media")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "speech_eval"))
    ap.add_argument("--plot", default=None, help="write predicted-vs-real PNGs here (needs matplotlib)")
    ap.add_argument("--only", default="", help="comma-separated clip names (e.g. the dev pairs' driving clips)")
    a = ap.parse_args(argv)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    evaluate(a.media, cache, plot_dir=Path(a.plot) if a.plot else None,
             only=tuple(x for x in a.only.split(",") if x))


if __name__ == "__main__":
    main()
