#!/usr/bin/env python3
"""Time and peak memory of the built-in engine's speech analysis on a long recording.

    python bench/speech_frontend.py [--minutes 120] [--dir DIR]

Writes a recording (phrases in English and Mandarin spoken by espeak-ng, in random order with pauses of 0.3-3 s,
16 kHz float32, written chunk by chunk so the generator never holds it) as the pipeline's on-disk AudioTrack, then, in a fresh process, runs
speech.analyse_speech on it with the shipped head and prints:
  load        Whisper model joined from the wheels, hash-checked and loaded, and the speech detector (once per process)
  analysis    wall and CPU seconds, seconds of audio per wall second, share of the stages (encoder+head, loudness)
  peak RSS    of the analysing process (ru_maxrss), model included
Nothing is kept after the run unless --dir is given.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SR = 16000
CHUNK_S = 60


PHRASES = (("en", "Good evening everyone, and welcome back to the stream."),
           ("en", "Today we are looking at three new products, starting with the smallest one."),
           ("en", "If you have questions, put them in the chat and I will answer them at the end."),
           ("cmn", "大家晚上好，欢迎来到今天的直播。"),
           ("cmn", "我们先看第一款产品，价格非常实惠。"),
           ("cmn", "有问题的朋友可以在评论区留言。"))


def write_recording(path: Path, minutes: float, seed: int = 0) -> int:
    """Speech, CHUNK_S at a time: the spoken phrases in random order and loudness, pauses of 0.3-3 s between them."""
    rng = np.random.default_rng(seed)
    from tests.mediagen import spoken  # espeak-ng: speech the speech detector hears as speech (syllables: 0 %)

    phrases = [spoken(text, voice) for voice, text in PHRASES]
    total = int(minutes * 60 * SR)
    written = 0
    pending = np.zeros(0, np.float32)
    with open(path, "wb") as f:
        while written < total:
            n = min(CHUNK_S * SR, total - written)
            parts, have = [pending], len(pending)
            while have < n:
                p = phrases[rng.integers(len(phrases))] * rng.uniform(0.3, 1.0)
                gap = np.zeros(int(rng.uniform(0.3, 3.0) * SR), np.float32)
                parts += [p, gap]
                have += len(p) + len(gap)
            block = np.concatenate(parts)
            block[:n].astype("<f4").tofile(f)
            pending = block[n:]
            written += n
    return total


def analyse(pcm: str, n_samples: int) -> dict:
    """Runs in the measuring process: model load, then the analysis, with stage timings."""
    from heygem_watch.audio import AudioTrack
    from heygem_watch import vad
    from heygem_watch.engines.builtin import speech, whisper
    from heygem_watch.engines.builtin.head import load_head

    t0, c0 = time.monotonic(), time.process_time()
    enc = whisper.load_encoder()
    detector = vad.load_detector()
    head = load_head()
    load_s = time.monotonic() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    track = AudioTrack(Path(pcm), n_samples)
    t1, c1 = time.monotonic(), time.process_time()
    pred = speech.head_output(track, head, enc)
    t2 = time.monotonic()
    active = speech.speech_activity(track, detector=detector)
    t3 = time.monotonic()
    curve = speech.curves_from_head(pred, head.targets, active)
    t4, c4 = time.monotonic(), time.process_time()
    return {"audio_s": n_samples / SR, "frames": len(curve), "load_s": load_s, "load_cpu_s": c1 - c0,
            "analysis_wall_s": t4 - t1, "analysis_cpu_s": c4 - c1, "encoder_head_s": t2 - t1,
            "voice_activity_s": t3 - t2, "curves_s": t4 - t3, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "speech_fraction": float(curve.speech.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=120.0)
    ap.add_argument("--dir", type=Path, default=None, help="keep the generated recording here")
    ap.add_argument("--_analyse", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._analyse:
        print(json.dumps(analyse(args._analyse[0], int(args._analyse[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        d = args.dir or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        pcm = d / "audio16k.f32"
        t = time.monotonic()
        n = write_recording(pcm, args.minutes)
        print(f"generated {args.minutes:g} min of spoken phrases and pauses in {time.monotonic() - t:.0f} s ({pcm})")
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, __file__, "--_analyse", str(pcm), str(n)], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
    a = r["audio_s"]
    print(f"load        {r['load_s']:.2f} s wall (model joined, hash-checked, loaded); RSS after load "
          f"{r['rss_after_load_mb']:.0f} MB")
    print(f"analysis    {r['analysis_wall_s']:.1f} s wall, {r['analysis_cpu_s']:.1f} s CPU for {a / 60:.1f} min of "
          f"audio = {a / r['analysis_wall_s']:.0f}x real time ({r['analysis_wall_s'] / a * 60:.2f} s per minute)")
    print(f"  stages    encoder+head {r['encoder_head_s']:.1f} s, voice activity (loudness + speech detector) "
          f"{r['voice_activity_s']:.1f} s, curves {r['curves_s']:.2f} s; speech in {r['speech_fraction']:.0%} of "
          f"{r['frames']} frames")
    print(f"peak RSS    {r['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
