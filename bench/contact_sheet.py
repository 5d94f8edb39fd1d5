#!/usr/bin/env python3
"""Contact sheet of a rendered video, to look at the mouth by eye: PNG, one tile per sampled frame.

Each tile: the full frame (scaled down), the mouth crop enlarged x2 beside it, and a caption: frame number, time,
the audio level around that frame (dB RMS over +-40 ms, relative to the loudest 5 % of the recording), and, with
--curves (an npz from bench/render_fidelity.py), the target opening the engine asked for and the one measured.

  PYTHONPATH=. .venv/bin/python bench/contact_sheet.py OUT.mp4 --audio REC.wav --png sheet.png [--t0 S] [--t1 S]
                                                       [--tiles 24] [--cols 4] [--curves curves.npz]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heygem_watch import face  # noqa: E402
from heygem_watch.media import iter_video_frames, probe  # noqa: E402

TILE_H = 220  # full-frame thumbnail height (px)
MOUTH_HALF = 0.55  # half-size of the mouth crop, inter-ocular units (before the x2 enlargement)
CAPTION_H = 36
LEVEL_WIN_S = 0.04


def audio_levels(path: Path, work: Path):
    """(rate, samples) 16 kHz mono of any media file, via the project's own decoder."""
    from heygem_watch.audio import extract_audio

    tr = extract_audio(path, work)
    return tr.sample_rate, tr.all()


def level_db(x: np.ndarray, rate: int, t: float, ref: float) -> float:
    a, b = max(0, int((t - LEVEL_WIN_S) * rate)), max(1, int((t + LEVEL_WIN_S) * rate))
    seg = x[a:b]
    rms = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2))) if len(seg) else 0.0
    return 20 * np.log10(rms + 1e-9) - ref


def sheet(video: Path, png: Path, audio: Path | None, t0: float, t1: float | None, tiles: int, cols: int,
          curves: Path | None = None, title: str = "") -> Path:
    import cv2
    import tempfile

    info = probe(video)
    fps = float(info.fps)
    n_total = int(round(info.duration * fps))
    f0 = int(t0 * fps)
    f1 = n_total - 1 if t1 is None else min(n_total - 1, int(t1 * fps))
    want = sorted(set(np.linspace(f0, f1, tiles).round().astype(int).tolist()))
    x = rate = None
    ref = 0.0
    if audio is not None:
        with tempfile.TemporaryDirectory() as d:
            rate, x = audio_levels(audio, Path(d))
        hop = rate // 100
        fr = x[: len(x) // hop * hop].reshape(-1, hop)
        rms_db = 20 * np.log10(np.sqrt((fr.astype(np.float64) ** 2).mean(1)) + 1e-9)
        ref = float(np.percentile(rms_db, 95))
    cv = np.load(curves) if curves is not None else None
    tiles_img = []
    with face.FaceMesh(static_image=False) as mesh:
        for i, img in enumerate(iter_video_frames(video)):
            if i > want[-1]:
                break
            lm = mesh.detect(img)  # every frame: tracking mode, as the judge measures
            if i not in want:
                continue
            h, w = img.shape[:2]
            s = TILE_H / h
            thumb = cv2.resize(img, (int(w * s), TILE_H), interpolation=cv2.INTER_AREA)
            if lm is not None:
                c = 0.5 * (lm[13] + lm[14])
                r = MOUTH_HALF * float(face.inter_ocular(lm))
                x0, y0 = int(c[0] - r), int(c[1] - r)
                pad = int(r) + 2  # beyond the frame: flat grey (replicated edges would look like smeared skin)
                big = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(128, 128, 128))
                m = big[y0 + pad:y0 + pad + int(2 * r), x0 + pad:x0 + pad + int(2 * r)]
                m = cv2.resize(m, (TILE_H, TILE_H), interpolation=cv2.INTER_CUBIC)
                cv2.rectangle(thumb, (int(x0 * s), int(y0 * s)), (int((x0 + 2 * r) * s), int((y0 + 2 * r) * s)),
                              (0, 255, 255), 1)
            else:
                m = np.zeros((TILE_H, TILE_H, 3), np.uint8)
            tile = np.hstack([thumb, m])
            cap = np.full((CAPTION_H, tile.shape[1], 3), 255, np.uint8)
            t = i / fps
            txt = f"#{i} {t:.2f}s"
            if x is not None:
                txt += f"  audio {level_db(x, rate, t, ref):+.0f} dB"
            if lm is not None:
                txt += f"  open {float(face.mouth_openness(lm)):.3f}"
            cv2.putText(cap, txt, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
            if cv is not None and i < len(cv["target"]):
                cv2.putText(cap, f"target {float(cv['target'][i]):.3f}  from tpl frame {int(cv['chosen'][i])}",
                            (4, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 160), 1, cv2.LINE_AA)
            tiles_img.append(np.vstack([tile, cap]))
    tw = max(t.shape[1] for t in tiles_img)
    tiles_img = [cv2.copyMakeBorder(t, 2, 2, 2, 2 + tw - t.shape[1], cv2.BORDER_CONSTANT, value=(80, 80, 80))
                 for t in tiles_img]
    rows = []
    for k in range(0, len(tiles_img), cols):
        row = tiles_img[k:k + cols]
        row += [np.full_like(tiles_img[0], 80)] * (cols - len(row))
        rows.append(np.hstack(row))
    out = np.vstack(rows)
    if title:
        head = np.full((24, out.shape[1], 3), 255, np.uint8)
        cv2.putText(head, title, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        out = np.vstack([head, out])
    png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(png), out)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video", type=Path)
    ap.add_argument("--audio", type=Path, help="media whose audio levels are printed (default: the video's own)")
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--t0", type=float, default=0.0)
    ap.add_argument("--t1", type=float)
    ap.add_argument("--tiles", type=int, default=24)
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--curves", type=Path)
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    print(sheet(a.video, a.png, a.audio or a.video, a.t0, a.t1, a.tiles, a.cols, a.curves, a.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
