#!/usr/bin/env python3
"""Throughput and memory of the whole job (issue: long recordings, many templates).

For recordings of --lengths seconds (default 60 and 600) at 1280x720 25 fps and 1 and 3 templates, runs the real
pipeline (`pipeline.process_files`, the code path of `heygem-watch process`) in a fresh subprocess and prints:
wall time, speed vs real time, peak RSS (ru_maxrss of that subprocess), template analysis time (cold first, cache
hits after), and the ratio to a plain decode+encode of the same output length with the same encoder settings,
measured in the same run (also in a subprocess).

Inputs are generated under --work at run time: templates from real talking clips in ../shared/media when present
(scaled and padded to 1280x720 at 25 fps), else from the public-domain photo used by the tests; the recording is an
FLV (small H.264 + AAC) whose speech loops clips from ../shared/media/audio, else synthetic speech. Nothing is committed.

    .venv/bin/python bench/throughput.py [--lengths 60 600] [--templates 1 3] [--engine builtin]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "media"
W, H, FPS = 1280, 720, Fraction(25)
TEMPLATE_SECONDS = 10
TEMPLATE_SOURCES = ["templates/videoretalking_face2.mp4", "templates/videoretalking_face3.mp4",
                    "templates/videoretalking_face5.mp4"]
SPEECH_SOURCES = ["audio/ljspeech_LJ001-0001.wav", "audio/sadtalker_chinese_news.wav", "audio/hallo_driving_audio2.wav",
                  "audio/echomimic_jane.wav"]


def _fit(img: np.ndarray) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    s = min(W / w, H / h)
    small = cv2.resize(img, (int(w * s) // 2 * 2, int(h * s) // 2 * 2), interpolation=cv2.INTER_AREA)
    out = np.full((H, W, 3), 40, np.uint8)
    y, x = (H - small.shape[0]) // 2, (W - small.shape[1]) // 2
    out[y:y + small.shape[0], x:x + small.shape[1]] = small
    return out


def make_template(i: int, path: Path) -> Path:
    """10 s, 1280x720, 25 fps: a real talking clip (looped) or the moving public-domain photo."""
    sys.path.insert(0, str(ROOT))
    from heygem_watch.media import iter_video_frames
    from tests import mediagen

    if path.exists():
        return path
    src = SHARED / TEMPLATE_SOURCES[i % len(TEMPLATE_SOURCES)]
    n = int(TEMPLATE_SECONDS * FPS)
    if src.exists():
        frames = [_fit(f) for f in iter_video_frames(src)]
        seq = (frames[k % len(frames)] for k in range(n))
    else:
        seq = (_fit(f) for f in mediagen.face_frames(n, size=(600, 512)))
    mediagen.write_video(path, seq, FPS)
    return path


def speech(rate: int) -> np.ndarray:
    """The speech of SPEECH_SOURCES joined, 0.5 s of silence after each (mono float32 at rate), or the tests'
    synthetic speech (30 s) when ../shared/media is not there."""
    import av

    clips = []
    for rel in SPEECH_SOURCES:
        p = SHARED / rel
        if p.exists():
            with av.open(str(p)) as c:
                rs = av.AudioResampler(format="flt", layout="mono", rate=rate)
                clips += [r.to_ndarray().reshape(-1) for fr in c.decode(c.streams.audio[0]) for r in rs.resample(fr)]
            clips.append(np.zeros(rate // 2, np.float32))
    if clips:
        return np.concatenate(clips)
    sys.path.insert(0, str(ROOT))
    from tests import mediagen

    return mediagen.speech_like(30, rate)


def make_recording(seconds: int, path: Path) -> Path:
    """FLV like OBS writes: H.264 (small picture) + AAC 44.1 kHz, speech for `seconds`."""
    import av

    if path.exists():
        return path
    rate = 44100
    voice = speech(rate)
    total = seconds * rate
    with av.open(str(path), "w", format="flv") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 320, 180, "yuv420p"
        vs.codec_context.options = {"preset": "ultrafast"}
        as_ = out.add_stream("aac", rate=rate, layout="mono")
        frame = np.full((180, 320, 3), 60, np.uint8)
        s = 0
        for k in range(seconds * 25):
            frame[:, :, 1] = k % 255
            for p in vs.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                out.mux(p)
            while s < min(total, (k + 1) * rate // 25):  # FLV wants the streams interleaved in time
                idx = np.arange(s, min(s + 1024, total)) % len(voice)
                af = av.AudioFrame.from_ndarray(voice[idx][None].astype(np.float32), format="flt", layout="mono")
                af.sample_rate, af.pts = rate, s
                for p in as_.encode(af):
                    out.mux(p)
                s += 1024
        for p in vs.encode(None):
            out.mux(p)
        for p in as_.encode(None):
            out.mux(p)
    return path


# --- children: each measurement runs in its own process so ru_maxrss is its own peak ------------------------------

def _Passthrough():
    """--engine none: the pipeline alone (decode cache, ping-pong, encode, mux), to see what an engine adds."""
    from heygem_watch.engines.base import Engine

    class Passthrough(Engine):
        name = "none"

        def render(self, template, state, speech, jobs):
            for j in jobs:
                yield j.image

    return Passthrough()


def child_job(args) -> dict:
    from heygem_watch import pipeline
    from heygem_watch.engines import create_engine
    from heygem_watch.media import EncoderSettings

    enc = EncoderSettings(preset=args.preset, crf=args.crf, threads=args.threads,
                          params="" if args.params == "-" else args.params)
    t0 = time.monotonic()
    engine = _Passthrough() if args.engine == "none" else create_engine(args.engine)
    outs = [Path(args.out_dir) / f"{Path(t).stem}.mp4" for t in args.tpl]
    res = pipeline.process_files(args.recording, args.tpl, outs, engine, var_dir=args.var, encoder=enc)
    wall = time.monotonic() - t0
    bad = [str(r) for r in res if isinstance(r, BaseException)]
    return {"wall_s": wall, "errors": bad, "out_s": sum(r.duration_s for r in res if not isinstance(r, BaseException)),
            "analysis_s": [round(r.template_analysis_s, 2) for r in res if not isinstance(r, BaseException)],
            "cache_hit": [r.template_cache_hit for r in res if not isinstance(r, BaseException)]}


def child_plain(args) -> dict:
    """Plain transcode: decode the template (looped), encode the same number of frames with the same settings,
    mux the same audio. What any tool that re-encodes the template to the recording's length pays at least."""
    from heygem_watch.audio import extract_audio
    from heygem_watch.media import EncoderSettings, VideoWriter, iter_video_frames, probe
    from heygem_watch.pipeline import frame_count

    enc = EncoderSettings(preset=args.preset, crf=args.crf, threads=args.threads,
                          params="" if args.params == "-" else args.params)
    t0 = time.monotonic()
    total = 0.0
    for k, tpl in enumerate(args.tpl):
        track = extract_audio(args.recording, Path(args.var) / f"plain{k}")
        info = probe(tpl)
        n = frame_count(track.duration, info.fps)
        w = VideoWriter(Path(args.out_dir) / f"plain{k}.mp4", info.width, info.height, info.fps, track.m4a_path, enc)
        done = 0
        while done < n:
            for f in iter_video_frames(tpl):
                w.write(f)
                done += 1
                if done == n:
                    break
        w.close()
        total += n / float(info.fps)
    return {"wall_s": time.monotonic() - t0, "out_s": total}


def run_child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode]
    for k, v in kw.items():
        for item in (v if isinstance(v, list) else [v]):
            cmd += [f"--{k}", str(item)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[60, 600])
    ap.add_argument("--templates", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--engine", default="builtin")
    ap.add_argument("--work", default="/tmp/heygem-bench")
    from heygem_watch.config import EncoderSettings

    dflt = EncoderSettings()
    ap.add_argument("--preset", default=dflt.preset)
    ap.add_argument("--crf", type=int, default=dflt.crf)
    ap.add_argument("--params", default=dflt.params or "-", help="x264-params, - for none")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child")
    ap.add_argument("--recording")
    ap.add_argument("--tpl", action="append")
    ap.add_argument("--out_dir")
    ap.add_argument("--var")
    a = ap.parse_args()
    if a.child:
        res = child_job(a) if a.child == "job" else child_plain(a)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    work = Path(a.work)
    (work / "out").mkdir(parents=True, exist_ok=True)
    var = work / "var"
    tpls = [str(make_template(i, work / f"template{i}_1280x720.mp4")) for i in range(max(a.templates))]
    print(f"engine={a.engine} x264 preset={a.preset} crf={a.crf} params={a.params} threads={a.threads or 'auto'} cores={os.cpu_count()}")
    print(f"{'rec_s':>6} {'tpls':>4} {'job_wall_s':>10} {'speed_x':>8} {'peak_rss_MB':>11} {'analysis_s':>14} "
          f"{'plain_wall_s':>12} {'plain_rss_MB':>12} {'job/plain':>9}")
    for secs in a.lengths:
        rec = str(make_recording(secs, work / f"recording_{secs}s.flv"))
        for nt in a.templates:
            job = run_child("job", recording=rec, tpl=tpls[:nt], out_dir=str(work / "out"), var=str(var),
                            engine=a.engine, preset=a.preset, crf=a.crf, params=a.params, threads=a.threads)
            if job["errors"]:
                raise SystemExit(f"job failed: {job['errors']}")
            plain = run_child("plain", recording=rec, tpl=tpls[:nt], out_dir=str(work / "out"), var=str(var / "plain"),
                              preset=a.preset, crf=a.crf, params=a.params, threads=a.threads)
            print(f"{secs:>6} {nt:>4} {job['wall_s']:>10.1f} {job['out_s'] / job['wall_s']:>8.2f} "
                  f"{job['peak_rss_mb']:>11.0f} {','.join(f'{x:g}' for x in job['analysis_s']):>14} "
                  f"{plain['wall_s']:>12.1f} {plain['peak_rss_mb']:>12.0f} {job['wall_s'] / plain['wall_s']:>9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
