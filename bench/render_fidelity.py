#!/usr/bin/env python3
"""Does the rendered mouth follow the curve the built-in engine aimed at?  (render fidelity, issue #10 item 5)

For each dev pair (template <- driving clip's audio) it renders the template with the built-in engine through the
pipeline (pipeline.run_task: the real H.264 output), records the per-frame target opening the engine asked for
(BuiltinEngine.targets, inner gap / inter-ocular distance) and the template frame the selector chose, then measures
the openness on the decoded output with the project's own FaceMesh (face.mouth_openness: lips 13-14 over the eye
distance). Per pair it prints
  corr      Pearson correlation, target vs rendered (lag 0)            -- the figure that must reach 0.85
  sel_corr  target vs the chosen template frame's own openness         -- what the mouth library alone gives
  slope/off rendered ~= slope * target + off (iod units)               -- compression of the range
  lag       lag (output frames, + = rendered late) maximising the correlation within +-4
  shut      mean rendered openness where the target is < 0.01 (iod)    -- does the mouth close?
  judge-mesh  corr as the lip-sync judge's FaceMesh settings read the output (no lip refinement): the judge scores
            what it sees, and on real talking faces the two settings agree only to ~0.85-0.95 themselves
  width     corr of the wanted mouth width (corners, iod) with the rendered one
--pair TEMPLATE RECORDING (repeatable) renders those instead of the dev pairs (a still photo, a Mandarin recording).
Each pair's curves (target, rendered, chosen frames) are saved as curves.npz beside its out.mp4 in --work; feed them
to bench/contact_sheet.py --curves to look at the frames.

  PYTHONPATH=. .venv/bin/python bench/render_fidelity.py [--pairs TSV] [--media DIR] [--work DIR] [--only SUBSTR]
                                                         [--pair TEMPLATE RECORDING ...]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heygem_watch import face  # noqa: E402
from heygem_watch.engines import create_engine  # noqa: E402
from heygem_watch.media import iter_video_frames  # noqa: E402
from heygem_watch.pipeline import RecordingJob, run_task  # noqa: E402
from heygem_watch.template import load_template  # noqa: E402

PAIRS = "/work/shared/tools/dev_pairs.tsv"
MEDIA = "/work/shared/media"
MAX_LAG = 4
SHUT_BELOW = 0.01  # target gap (iod) counted as "mouth shut"
PAUSE_DB = 35.0  # a pause: RMS this far below the recording's loud 5 % ...
PAUSE_MIN_S = 0.25  # ... for at least this long (the judge's silence rule)
SPEECH_DB = 20.0  # speech: RMS within this of the loud 5 %
SYL_PROM_DB = 6.0  # a syllable: a loudness peak standing this far above its surroundings


def read_pairs(path: str) -> list[tuple[str, str]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            t, d = line.split("\t")[:2]
            out.append((t.strip(), d.strip()))
    return out


class Recorder:
    """Wraps an engine instance: keeps (target gap, chosen template frame) per output frame, in order."""

    def __init__(self, engine):
        self.gap: list[float] = []
        self.width: list[float] = []
        self.chosen: list[int] = []
        draw = engine._draw

        def _draw(template, state, item, s):
            self.gap.append(float(item[1]))
            self.width.append(float(item[2]))
            self.chosen.append(int(s))
            return draw(template, state, item, s)

        engine._draw = _draw


def measure(path: Path) -> tuple[np.ndarray, np.ndarray, list]:
    """Per frame of a video: openness (n,) with the project's FaceMesh (refined lips, tracking mode), openness (n,)
    as the judge measures it (no lip refinement, full-size frames), both NaN where no face; project landmarks;
    mouth width (n,) (corners 61-291 / iod, project mesh)."""
    import cv2

    opn, plain, lms, wid = [], [], [], []
    judge = face._face_mesh_module().FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=False,
                                              min_detection_confidence=0.3, min_tracking_confidence=0.3)
    with face.FaceMesh(static_image=False) as mesh:
        for img in iter_video_frames(path):
            lm = mesh.detect(img)
            lms.append(lm)
            opn.append(np.nan if lm is None else float(face.mouth_openness(lm)))
            wid.append(np.nan if lm is None else float(np.linalg.norm(lm[face.MOUTH_LEFT] - lm[face.MOUTH_RIGHT])
                                                       / face.inter_ocular(lm)))
            res = judge.process(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
            if res.multi_face_landmarks:
                h, w = img.shape[:2]
                p = np.array([(q.x * w, q.y * h) for q in res.multi_face_landmarks[0].landmark])
                plain.append(float(face.mouth_openness(p)))
            else:
                plain.append(np.nan)
    judge.close()
    return np.asarray(opn), np.asarray(plain), lms, np.asarray(wid)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 10 or a[ok].std() < 1e-9 or b[ok].std() < 1e-9:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def lagged(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    """corr(a shifted by lag, b): lag > 0 = b (rendered) late."""
    if lag >= 0:
        return corr(a[: len(a) - lag], b[lag:])
    return corr(a[-lag:], b[: len(b) + lag])


def figures(target: np.ndarray, rendered: np.ndarray, chosen_open: np.ndarray) -> dict:
    n = min(len(target), len(rendered))
    t, r = target[:n], rendered[:n]
    ok = np.isfinite(t) & np.isfinite(r)
    slope, off = np.polyfit(t[ok], r[ok], 1) if ok.sum() > 2 else (np.nan, np.nan)
    lags = {k: lagged(t, r, k) for k in range(-MAX_LAG, MAX_LAG + 1)}
    best = max(lags, key=lambda k: -1 if np.isnan(lags[k]) else lags[k])
    shut = ok & (t < SHUT_BELOW)
    return {"frames": int(n), "face": round(float(np.isfinite(r).mean()), 3), "corr": round(corr(t, r), 3),
            "sel_corr": round(corr(t, chosen_open[:n]), 3), "slope": round(float(slope), 3),
            "off": round(float(off), 4), "lag": best, "corr_lag": round(lags[best], 3),
            "shut": round(float(np.mean(r[shut])), 4) if shut.any() else None,
            "t_range": (round(float(np.nanmin(t)), 3), round(float(np.nanmax(t)), 3)),
            "r_range": (round(float(np.nanpercentile(r, 3)), 3), round(float(np.nanpercentile(r, 97)), 3))}


def loudness_db(samples: np.ndarray, rate: int) -> np.ndarray:
    """RMS level (dB) per 10 ms frame."""
    hop = rate // 100
    n = len(samples) // hop
    return 20 * np.log10(np.sqrt((samples[: n * hop].reshape(n, hop).astype(np.float64) ** 2).mean(1)) + 1e-9)


def syllable_rate(db: np.ndarray) -> tuple[float, np.ndarray]:
    """(loudness peaks per second of speech: syllable nuclei of prominence >= SYL_PROM_DB, speech mask per 10 ms
    frame: the smoothed level within SPEECH_DB of the loud 5 %) from loudness_db's levels."""
    from scipy.signal import find_peaks

    smooth = np.convolve(db, np.hanning(5) / np.hanning(5).sum(), "same")
    speech = smooth > np.percentile(db, 95) - SPEECH_DB
    pk, _ = find_peaks(smooth, prominence=SYL_PROM_DB, distance=8)
    return float(speech[pk].sum() / max(speech.sum() / 100, 1e-3)), speech


def opening_rate(curve: np.ndarray, speech: np.ndarray, speech_s: float) -> float:
    """Openness peaks (prominence >= a quarter of the curve's p5-p95 range) inside speech (a mask at the curve's
    own frames) per speech_s seconds of speech. The same count on a real mouth, a target curve or a rendered one
    (openness >= 0; frames without a face, NaN, count as shut)."""
    from scipy.signal import find_peaks

    curve = np.asarray(curve, np.float64)
    span = np.nanpercentile(curve, 95) - np.nanpercentile(curve, 5)
    mk, _ = find_peaks(np.where(np.isfinite(curve), curve, 0.0), prominence=max(0.25 * span, 1e-3))
    return float(speech[mk[mk < len(speech)]].sum() / max(speech_s, 1e-3))


def audio_figures(samples: np.ndarray, rate: int, rendered: np.ndarray, fps: float, target: np.ndarray) -> dict:
    """What the mouth does against the recording's own sound, language-independent:
      pause     mean rendered openness in pauses (>= PAUSE_MIN_S, RMS PAUSE_DB below the loud 5 %) over that in
                speech (within SPEECH_DB): 0 = shut in every pause (the judge's silence measure, on any audio)
      syl_hz    loudness peaks per second of speech (syllable nuclei, prominence >= SYL_PROM_DB)
      open_hz   rendered openness peaks per second of speech (prominence >= a quarter of its p5-p95 range)
      target_hz the same count on the target curve (what the engine asked for)
    Real talking faces open at about 0.45 of syl_hz by these counts (bench/speech_corpus_eval.py, section 4)."""
    db = loudness_db(samples, rate)
    n = len(db)
    ref = np.percentile(db, 95)
    t_out = np.arange(len(rendered)) / fps
    db_out = np.interp(t_out, (np.arange(n) + 0.5) / 100, db)
    quiet = db_out < ref - PAUSE_DB
    run = max(1, int(round(PAUSE_MIN_S * fps)))
    pause = quiet & (np.convolve(quiet.astype(int), np.ones(run, int), "same") >= run)
    speech = db_out > ref - SPEECH_DB
    ok = np.isfinite(rendered)
    out = {"pause_s": round(float(pause.sum() / fps), 2)}
    if (pause & ok).sum() >= 3 and (speech & ok).sum() >= 3:
        out["pause"] = round(float(rendered[pause & ok].mean() / (rendered[speech & ok].mean() + 1e-9)), 3)
    syl_hz, speech100 = syllable_rate(db)
    out["syl_hz"] = round(syl_hz, 2)
    for key, curve in (("open_hz", rendered), ("target_hz", target[: len(rendered)])):
        out[key] = round(opening_rate(curve, speech, speech100.sum() / 100), 2)
    return out


def run_pair(template: Path, driving: Path, work: Path, cache: Path, engine_name: str = "builtin") -> dict:
    engine = create_engine(engine_name)
    rec = Recorder(engine)
    job = RecordingJob.prepare(driving, work / "audio")
    out = work / "out.mp4"
    t0 = time.monotonic()
    run_task(job, template, engine, out, work / "tmp", cache)
    wall = time.monotonic() - t0
    rendered, plain, lms, width = measure(out)
    tpl = load_template(template, cache)
    lib_open = face.mouth_openness(np.asarray(tpl.landmarks, np.float64))
    chosen_open = lib_open[np.asarray(rec.chosen)]
    res = figures(np.asarray(rec.gap), rendered, chosen_open)
    res["wall_s"] = round(wall, 1)
    res["judge_corr"] = round(corr(np.asarray(rec.gap), plain[: len(rec.gap)]), 3)
    res["width_corr"] = round(corr(np.asarray(rec.width), width[: len(rec.width)]), 3)
    res.update(audio_figures(job.track.all(), job.track.sample_rate, rendered, float(tpl.fps), np.asarray(rec.gap)))
    np.savez(work / "curves.npz", target=np.asarray(rec.gap), rendered=rendered, width_target=np.asarray(rec.width),
             width=width, plain=plain, chosen=np.asarray(rec.chosen),
             chosen_open=chosen_open, fps=float(tpl.fps), template=str(template), driving=str(driving))
    return res


def main(argv=None) -> int:
    from heygem_watch import logs

    logs.configure("console", "warning", sys.stderr)  # the engine's info events would interleave with the table
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=PAIRS)
    ap.add_argument("--media", default=MEDIA)
    ap.add_argument("--work", default="/tmp/render_fidelity")
    ap.add_argument("--only", default="", help="run only pairs whose template or driving path contains this")
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--pair", nargs=2, action="append", metavar=("TEMPLATE", "AUDIO"),
                    help="render this template with this recording instead of the dev pairs (repeatable)")
    a = ap.parse_args(argv)
    media, work = Path(a.media), Path(a.work)
    cache = work / "cache"
    rows = []
    pairs = [(str(Path(t).resolve()), str(Path(d).resolve())) for t, d in a.pair] if a.pair else read_pairs(a.pairs)
    for tpl, drv in pairs:
        if a.only and a.only not in tpl and a.only not in drv:
            continue
        name = f"{Path(tpl).stem}__{Path(drv).stem}"
        w = work / name
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        res = run_pair(media / tpl, media / drv, w, cache)
        rows.append((name, res))
        print(f"{name:55s} corr {res['corr']:.3f}  judge-mesh {res['judge_corr']:.3f}  width {res['width_corr']:.3f}  sel_corr {res['sel_corr']:.3f}  slope {res['slope']:.2f} "
              f"off {res['off']:+.3f}  lag {res['lag']:+d} ({res['corr_lag']:.3f})  shut {res['shut']}  "
              f"target {res['t_range']} rendered p3-p97 {res['r_range']}  face {res['face']}  {res['wall_s']} s  "
              f"pause {res.get('pause')} ({res['pause_s']} s)  syllables {res['syl_hz']}/s  openings {res['open_hz']}/s "
              f"(target {res['target_hz']}/s)",
              flush=True)
    if not rows:
        print("no pairs matched", file=sys.stderr)
        return 2
    cs = [r["corr"] for _, r in rows]
    ok = all(c >= a.target for c in cs)
    print(f"min corr {min(cs):.3f}  mean {np.mean(cs):.3f}  target >= {a.target} each: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
