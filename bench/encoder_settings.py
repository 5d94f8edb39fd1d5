#!/usr/bin/env python3
"""What the x264 settings cost and give: re-encode videos with several settings and print, per setting, the encoder's
CPU per frame, the file size and the PSNR of the luma against the frames it was given.

Give it outputs heygem-watch made (those are what the settings apply to). The frames are decoded once into memory,
then encoded into memory for each setting (best CPU of --repeat runs, since this box's timing varies by ~10 %),
decoded again and compared. The default settings are config.EncoderSettings'; `veryfast crf 18` was the default
before 2026-12-07.

  PYTHONPATH=. .venv/bin/python bench/encoder_settings.py OUT.mp4 [OUT2.mp4 ...] [--repeat 2]
"""
from __future__ import annotations

import argparse
import io
import resource
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heygem_watch.config import EncoderSettings  # noqa: E402

SETTINGS = {  # name -> (preset, crf, x264-params)
    "default": (EncoderSettings().preset, EncoderSettings().crf, EncoderSettings().params),
    "veryfast crf 18": ("veryfast", 18, ""),
    "superfast crf 17": ("superfast", 17, ""),
    "default at crf 16": (EncoderSettings().preset, 16, EncoderSettings().params),
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def encode(frames: list[np.ndarray], width: int, height: int, preset: str, crf: int, params: str) -> tuple[bytes, float]:
    """yuv420p frames (h*3/2, w) -> (MP4 bytes, CPU seconds the encoding took, all threads)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        opts = {"preset": preset, "crf": str(crf)}
        if params:
            opts["x264-params"] = params
        vs.codec_context.options = opts
        c0 = _cpu()
        for i, yuv in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = i
            for pkt in vs.encode(frame):
                out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)
        cpu = _cpu() - c0
    return buf.getvalue(), cpu


def luma_psnr(frames: list[np.ndarray], data: bytes, height: int) -> float:
    """Mean over frames of the luma PSNR (dB) of the encoded file against the frames given."""
    import av

    out = []
    with av.open(io.BytesIO(data)) as c:
        for ref, f in zip(frames, c.decode(video=0)):
            got = f.to_ndarray(format="yuv420p")[:height].astype(np.float32)
            mse = float(((got - ref[:height]) ** 2).mean())
            out.append(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))
    return float(np.mean(out))


def main() -> None:
    import av

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="+")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    print(f"{'video':<28} {'size':>9} {'setting':<18} {'cpu ms/frame':>12} {'kB':>7} {'psnr Y dB':>9}")
    for path in a.videos:
        with av.open(path) as c:
            frames = [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]
        height, width = frames[0].shape[0] * 2 // 3, frames[0].shape[1]
        for name, (preset, crf, params) in SETTINGS.items():
            best, data = None, b""
            for _ in range(max(1, a.repeat)):
                data, cpu = encode(frames, width, height, preset, crf, params)
                best = cpu if best is None else min(best, cpu)
            print(f"{Path(path).name[:28]:<28} {f'{width}x{height}':>9} {name:<18} {1000 * best / len(frames):>12.1f} "
                  f"{len(data) // 1024:>7} {luma_psnr(frames, data, height):>9.2f}", flush=True)


if __name__ == "__main__":
    main()
