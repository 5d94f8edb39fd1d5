#!/usr/bin/env python3
"""How well does speech analysis alone predict a real speaker's mouth? (no rendering involved)

For every real talking clip (video + its own audio) it measures the speaker's mouth openness per video frame the way
the independent judge does (inner-lip gap 13-14 / inter-ocular 33-263, MediaPipe FaceMesh), computes
heygem_watch.engines.builtin.speech.analyse_speech() from the clip's audio, samples `open` at the video frame times and prints:
  corr0     Pearson correlation at lag 0
  best_lag  lag in frames (+ = predicted late) maximising the correlation within +-8, and that correlation
and pooled correlations (each clip z-scored, lag 0) like the judge's pooled_corr:
  dev       the dev pairs' driving clips (/work/shared/tools/dev_pairs.tsv; a clip used twice counts twice)
  speech    the clips whose audio really drives their mouth (see NOT_SYNCED for the ones left out)
  all       every clip with a face
--loo fits GATE_LEAD_S, GATE_TRAIL_S and SMOOTH_S leave-one-clip-out over the dev+speech clips (each clip scored with the values that
pool best over the others) and prints the held-out pooled figures.

Real openness tracks are cached (npz) in --cache; they are computed with the judge's own code
(/work/shared/tools/lipsync_eval.py) in its venv, so this measures against exactly what the judge sees.

  .venv/bin/python bench/speech_eval.py [--media /work/shared/media] [--cache /tmp/speech_eval] [--plot DIR] [--loo]
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
from heygem_watch.audio import ArrayTrack  # noqa: E402
from heygem_watch.engines.builtin.speech import SAMPLE_RATE, analyse_speech  # noqa: E402

TOOLS = "/work/shared/tools"
EVAL_PY = "/tmp/evalvenv/bin/python"
MAX_LAG = 8
MIN_FACE = 0.9  # clips where the judge finds a face in fewer frames are not talking-head clips
SKIP = ("videoretalking_face2_remux",)  # the same clip as videoretalking_face2, remuxed
DEV_PAIRS = "/work/shared/tools/dev_pairs.tsv"
# Clips whose soundtrack does not drive the visible mouth (listened to / looked at): d3 digital silence; d10, d14
# music over a mostly still mouth; the latentsync demos' mouths do not follow their soundtrack (corr ~0 at any lag
# for every feature tried). d9 (near-silent room noise, two lip clicks) stays: it is a dev pair.
NOT_SYNCED = ("liveportrait_d3", "liveportrait_d10", "liveportrait_d14", "latentsync_demo1_video",
              "latentsync_demo2_video", "latentsync_demo3_video")
LOO_GRID = {"GATE_LEAD_S": (0.05, 0.1, 0.15), "GATE_TRAIL_S": (0.03, 0.05, 0.1), "SMOOTH_S": (0.0, 0.02, 0.04)}

_TRACK_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {tools!r})
import lipsync_eval as le
ts, o, w, f = le.mouth_track({src!r})
np.savez({dst!r}, ts=ts, open=o, width=w, found=f)
"""


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
        sorted(glob.glob(os.path.join(media, "drivers", "*.mp4"))) + sorted(glob.glob(os.path.join(media, "flv", "*.flv")))
    return [p for p in paths if Path(p).stem not in SKIP]


def evaluate(media: str, cache: Path, analyse=analyse_speech, plot_dir: Path | None = None, verbose=True,
             only: tuple[str, ...] = ()) -> dict:
    rows = []
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
                     "corr_best": cors[best], "speed_x": len(audio) / SAMPLE_RATE / max(dt, 1e-9),
                     "pred": pred, "real": real})
        if plot_dir is not None:
            _plot(plot_dir / f"{name}.png", tr["ts"], real, pred, curve, name, cors[0])
    pooled = pooled_corr(rows)
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
        for label, names in (("dev", dev_clips()), ("speech", speech_clips(rows))):
            summary[label] = subset_summary(rows, names)
            print(f"{label:6s} {summary[label]}")
    summary["rows"] = rows
    return summary


def pooled_corr(rows: list[dict]) -> float:
    """The judge's pooled_corr: every row z-scored, concatenated, lag 0."""
    G, R = [], []
    for r in rows:
        p, q = r["pred"], r["real"]
        if p.std() > 1e-9 and q.std() > 1e-9:
            G.append((p - p.mean()) / p.std())
            R.append((q - q.mean()) / q.std())
    return float(np.corrcoef(np.concatenate(G), np.concatenate(R))[0, 1]) if G else float("nan")


def dev_clips(pairs: str = DEV_PAIRS) -> list[str]:
    """Driving clips of the dev pairs, repeated as often as the bench uses them."""
    out = []
    for line in open(pairs):
        if line.strip() and not line.startswith("#"):
            out.append(Path(line.rstrip("\n").split("\t")[1]).stem)
    return out


def speech_clips(rows: list[dict]) -> list[str]:
    return [r["clip"] for r in rows if r["clip"] not in NOT_SYNCED]


def subset_summary(rows: list[dict], names: list[str]) -> dict:
    by = {r["clip"]: r for r in rows}
    sel = [by[n] for n in names if n in by]
    return {"n": len(sel), "pooled_corr": round(pooled_corr(sel), 4),
            "mean_abs_lag": round(float(np.mean([abs(r["best_lag"]) for r in sel])), 2) if sel else None}


def leave_one_out(media: str, cache: Path) -> None:
    """Fit LOO_GRID leave-one-clip-out over the dev + speech clips; print the held-out pooled correlations."""
    import itertools

    import heygem_watch.engines.builtin.speech as sp

    saved = {k: getattr(sp, k) for k in LOO_GRID}
    names = sorted(set(dev_clips()) | set(speech_clips([{"clip": Path(p).stem} for p in clips(media)])))
    table = {}
    try:
        for values in itertools.product(*LOO_GRID.values()):
            for k, v in zip(LOO_GRID, values):
                setattr(sp, k, v)
            res = evaluate(media, cache, analyse=sp.analyse_speech, verbose=False, only=tuple(names))
            table[values] = {r["clip"]: r for r in res["rows"]}
    finally:
        for k, v in saved.items():
            setattr(sp, k, v)
    present = [n for n in names if n in next(iter(table.values()))]
    held = {}
    for n in present:
        others = [m for m in present if m != n]
        best = max(table, key=lambda v: pooled_corr([table[v][m] for m in others]))
        held[n] = table[best][n]
        print(f"LOO {n:26s} fitted {dict(zip(LOO_GRID, best))}  held-out corr0 {held[n]['corr0']:+.3f}")
    dev = [held[n] for n in dev_clips() if n in held]
    spc = [held[n] for n in present if n not in NOT_SYNCED]
    print(f"LOO dev pooled_corr {pooled_corr(dev):.4f}  LOO speech pooled_corr {pooled_corr(spc):.4f}")


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
    ap.add_argument("--loo", action="store_true", help="also fit LEAD_S/SMOOTH_S leave-one-clip-out (~20 s)")
    a = ap.parse_args(argv)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if a.loo:
        leave_one_out(a.media, cache)
    evaluate(a.media, cache, plot_dir=Path(a.plot) if a.plot else None,
             only=tuple(x for x in a.only.split(",") if x))


if __name__ == "__main__":
    main()
