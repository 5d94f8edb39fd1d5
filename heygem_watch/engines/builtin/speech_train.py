"""`heygem-watch train-speech`: fit the speech head on talking-face footage (real people, their own voice).

Per clip (cached under --cache, keyed by the file's content fingerprint):
    audio  16 kHz mono from the clip's first audio stream -> Whisper encoder features (whisper.py), 50 per second
    video  every frame through the project's face tracker (face.TrackPool) -> inner-lip gap / inter-ocular
           distance (the judges' openness) and lip-corner width / inter-ocular, at the frame's own timestamp
Targets are normalised per clip, so a head learns the shape of the movement, not a speaker's mouth size:
    open  = (gap - p5) / (p95 - p5)          0 shut .. 1 wide open for this speaker
    width = 2 (w - p5) / (p95 - p5) - 1      -1 narrow/rounded .. +1 spread
Fit: ridge regression on standardised features, PCA_DIM principal components, OFFSETS of context (head.py).
--from HEAD (own footage): keep HEAD's basis and shrink toward HEAD's weights instead of toward zero (fit_from).
Leave-speaker-out: each speaker's clips predicted by a head fitted on all other speakers; pooled = the judges'
pooled correlation (each clip z-scored, lag 0). Everything is deterministic (no random numbers).
Speakers: column `speaker` of a MANIFEST.tsv in a corpus folder or one of its two parents (column `file`, relative
to the MANIFEST's folder), else the clip's sub-folder under the corpus folder, else the clip's own name.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heygem_watch.audio import ArrayTrack  # noqa: F401 - also speech_train.ArrayTrack for the benches
from heygem_watch.engines.builtin import whisper
from heygem_watch.engines.builtin.head import SHIPPED, HeadError, SpeechHead, load_head

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".m4v")
OFFSETS = tuple(range(-6, 9))  # encoder frames (20 ms) of context: 120 ms past .. 160 ms future
PCA_DIM = 128
RIDGE = 3000.0  # L2 penalty on standardised components (times the number of frames / 1e4)
TARGETS = ("open", "width")
MIN_FACE = 0.8  # clips whose face is found in fewer frames are skipped
MIN_FRAMES = 10
CACHE_VERSION = "3"  # 3: a phone's footage is tracked as players show it (display.py: upright, HDR made SDR)


class TrainError(RuntimeError):
    """Training cannot go on (message names the folder or file)."""


@dataclass
class Clip:
    path: Path
    speaker: str
    feats: np.ndarray  # (n, DIM) float16 encoder features
    times: np.ndarray  # (m,) video frame times, s, on the audio's clock
    y: np.ndarray  # (m, len(TARGETS)) normalised targets, NaN where no face
    raw_open: np.ndarray  # (m,) measured inner gap / iod, NaN where no face


# --------------------------------------------------------------------------------------------------- corpus

def find_clips(dirs: list[Path]) -> list[tuple[Path, str]]:
    """(video path, speaker) of every video under the corpus folders, sorted, speakers from a MANIFEST.tsv."""
    out = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise TrainError(f"{d}: not a folder")
        manifest = _manifest_speakers(d)
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in VIDEO_EXTS or not p.is_file():
                continue
            rel = p.relative_to(d)
            spk = manifest.get(p.resolve()) or (rel.parts[0] if len(rel.parts) > 1 and not manifest else p.stem)
            out.append((p, spk))
    if not out:
        raise TrainError(f"no video files ({', '.join(VIDEO_EXTS)}) under {', '.join(map(str, dirs))}")
    return out


def _manifest_speakers(d: Path) -> dict[Path, str]:
    for m in (d / "MANIFEST.tsv", d.parent / "MANIFEST.tsv", d.parent.parent / "MANIFEST.tsv"):
        if m.is_file():
            with open(m, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            if rows and "file" in rows[0] and "speaker" in rows[0]:
                return {(m.parent / r["file"]).resolve(): r["speaker"] for r in rows if r.get("speaker")}
    return {}


def fingerprint(path: Path) -> str:
    """Cache key: the file's content, the cache layout and the encoder's compute type and depth (they change the
    features)."""
    h = hashlib.sha256(f"{CACHE_VERSION}/{whisper.COMPUTE_TYPE}/{whisper.ENCODER_LAYERS}".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def decode_audio(path: Path) -> tuple[np.ndarray, float]:
    """(16 kHz mono float32 samples of the first audio stream, its start time in s on the container's clock)."""
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio or not c.streams.video:
            raise TrainError(f"{path}: needs both a video and an audio stream")
        ast = c.streams.audio[0]
        a0 = float(ast.start_time * ast.time_base) if ast.start_time is not None else 0.0
        res = av.AudioResampler(format="flt", layout="mono", rate=whisper.SAMPLE_RATE)
        pcm = [r.to_ndarray().reshape(-1) for fr in c.decode(ast) for r in res.resample(fr)]
        pcm += [r.to_ndarray().reshape(-1) for r in res.resample(None)]
    return (np.concatenate(pcm).astype(np.float32) if pcm else np.zeros(0, np.float32)), a0


def track_video(path: Path, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """(frame times s minus t0, landmarks (m, 478, 2) NaN where no face) through face.TrackPool."""
    import av

    from heygem_watch import face
    from heygem_watch import display

    times = []
    with av.open(str(path)) as c, face.TrackPool() as pool:
        vst = c.streams.video[0]
        vst.thread_type = "AUTO"
        look = None
        for i, fr in enumerate(c.decode(vst)):
            times.append(float(fr.pts * vst.time_base) - t0 if fr.pts is not None else i / float(vst.average_rate))
            if look is None:  # a phone's footage: stored sideways, HDR; the face is tracked as players show it
                look = display.look_of(fr)
            rgb = display.picture(fr, look, "rgb24")
            pool.submit(i, rgb, rgb.shape[1], rgb.shape[0])
        found = pool.finish()
    lms = np.full((len(times), face.N_LANDMARKS, 2), np.nan, np.float32)
    for i, lm in found.items():
        if lm is not None:
            lms[i] = lm
    return np.asarray(times), lms


def normalise_targets(gap: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Per-clip normalised (open, width) (m, 2); NaN stays NaN."""
    out = np.full((len(gap), 2), np.nan, np.float32)
    ok = np.isfinite(gap) & np.isfinite(width)
    if ok.sum() < MIN_FRAMES:
        return out
    for k, (v, scale) in enumerate(((gap, 1.0), (width, 2.0))):
        p5, p95 = np.percentile(v[ok], (5.0, 95.0))
        out[ok, k] = (v[ok] - p5) / max(p95 - p5, 1e-4) * scale - (scale - 1.0)
    return out


def load_clip(path: Path, speaker: str, encoder, cache: Path | None) -> Clip | None:
    """Features and targets of one clip (cached), or None with a note when it has too little face."""
    from heygem_watch import face

    hit = cache / f"{fingerprint(path)}.npz" if cache else None
    if hit is not None and hit.exists():
        with np.load(hit) as z:
            feats, times, gap, width = z["feats"], z["times"], z["gap"], z["width"]
    else:
        audio, a0 = decode_audio(path)
        times, lms = track_video(path, a0)
        feats = whisper.encode_all(ArrayTrack(audio), encoder).astype(np.float16)
        gap = face.mouth_openness(lms).astype(np.float32)
        width = (np.linalg.norm(lms[:, face.MOUTH_LEFT] - lms[:, face.MOUTH_RIGHT], axis=-1)
                 / (face.inter_ocular(lms) + 1e-6)).astype(np.float32)
        if hit is not None:
            hit.parent.mkdir(parents=True, exist_ok=True)
            np.savez(hit.with_suffix(".tmp.npz"), feats=feats, times=times, gap=gap, width=width)
            os.replace(hit.with_suffix(".tmp.npz"), hit)
    found = np.isfinite(gap)
    if len(times) < MIN_FRAMES or found.mean() < MIN_FACE or len(feats) < MIN_FRAMES:
        print(f"  skipped {path.name}: face in {found.mean():.0%} of {len(times)} frames", file=sys.stderr)
        return None
    return Clip(path, speaker, feats, times, normalise_targets(gap, width), gap)


# --------------------------------------------------------------------------------------------------- fitting

def _stack(z: np.ndarray, idx: np.ndarray, offsets=OFFSETS) -> np.ndarray:
    n = len(z)
    return np.concatenate([z[np.clip(idx + o, 0, n - 1)] for o in offsets], axis=1)


@dataclass
class Basis:
    """Feature standardisation and whitened principal components (no mouth data involved)."""

    mean: np.ndarray
    scale: np.ndarray
    proj: np.ndarray


def basis(clips: list[Clip], pca_dim: int = PCA_DIM) -> Basis:
    n, s1, s2 = 0, 0.0, 0.0
    for c in clips:
        f = c.feats.astype(np.float64)
        n, s1, s2 = n + len(f), s1 + f.sum(0), s2 + f.T @ f
    mean = s1 / n
    cov = s2 / n - np.outer(mean, mean)
    scale = np.sqrt(np.maximum(np.diag(cov), 0.0)) + 1e-3
    vals, vecs = np.linalg.eigh(cov / np.outer(scale, scale))
    order = np.argsort(vals)[::-1][:pca_dim]
    proj = vecs[:, order]
    proj *= np.sign(proj[np.abs(proj).argmax(0), np.arange(proj.shape[1])])  # deterministic sign
    proj /= np.sqrt(np.maximum(vals[order], 0.0) + 1e-6)  # whitened components: one ridge penalty fits all
    return Basis(mean, scale, proj)


def head_basis(head: SpeechHead) -> Basis:
    """The basis a saved head was fitted in (its own standardisation and components, not recomputed)."""
    return Basis(head.mean.astype(np.float64), head.scale.astype(np.float64), head.proj.astype(np.float64))


def gram(b: Basis, clip: Clip, offsets=OFFSETS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Sufficient statistics of one clip's frames with a face: (X'X, X'y, sum X, sum y, n)."""
    z = ((clip.feats.astype(np.float64) - b.mean) / b.scale) @ b.proj
    idx = np.clip(np.rint(clip.times * whisper.FEATURE_RATE).astype(int), 0, len(z) - 1)
    ok = np.isfinite(clip.y).all(1)
    x, y = _stack(z, idx[ok], offsets), clip.y[ok].astype(np.float64)
    return x.T @ x, x.T @ y, x.sum(0), y.sum(0), len(x)


def solve(b: Basis, stats, offsets=OFFSETS, ridge: float = RIDGE, meta: dict | None = None,
          prior: tuple[np.ndarray, float] | None = None) -> SpeechHead:
    """Ridge head from summed gram() statistics (centred, so the bias is not penalised). prior (w0, strength):
    minimise |y - Xw|^2 + strength |w - w0|^2 instead, i.e. shrink toward w0 rather than toward zero."""
    xx, xy, sx, sy, n = stats
    xm, ym = sx / n, sy / n
    xx_c, xy_c = xx - n * np.outer(xm, xm), xy - n * np.outer(xm, ym)
    if prior is None:
        w = np.linalg.solve(xx_c + ridge * n / 1e4 * np.eye(len(xm)), xy_c)
    else:
        w0, strength = np.asarray(prior[0], np.float64), float(prior[1])
        w = np.linalg.solve(xx_c + strength * np.eye(len(xm)), xy_c + strength * w0)
    return SpeechHead(b.mean.astype(np.float32), b.scale.astype(np.float32), b.proj.astype(np.float32),
                      np.asarray(offsets, np.int32), w.astype(np.float32), (ym - xm @ w).astype(np.float32),
                      TARGETS, dict(meta or {}, frames=int(n)))


def _sum(stats):
    """Sum of gram() tuples, accumulated one at a time (a clip's X'X is ~30 MB: never hold them all)."""
    total = None
    for st in stats:
        total = st if total is None else tuple(a + b for a, b in zip(total, st))
    return total


def fit(clips: list[Clip], offsets=OFFSETS, pca_dim: int = PCA_DIM, ridge: float = RIDGE,
        meta: dict | None = None) -> SpeechHead:
    """A ridge head on these clips (frames with a face only)."""
    b = basis(clips, pca_dim)
    return solve(b, _sum(gram(b, c, offsets) for c in clips), offsets, ridge, dict(meta or {}, clips=len(clips)))


def prior_strength(base: SpeechHead) -> float:
    """How many frames of the operator's footage the base head's weights count as: its frames per speaker. Its
    basis is whitened on its own corpus, so its X'X is about frames x I there; but a new speaker is not one of its
    speakers, and what it knows about one is roughly one speaker's share of its frames, not all of them."""
    frames, speakers = base.meta.get("frames"), base.meta.get("speakers")
    if not frames or not speakers:
        raise TrainError("the base speech model records no frames/speakers (not from `heygem-watch train-speech`)")
    return float(frames) / float(speakers)


def fit_from(base: SpeechHead, clips: list[Clip], strength: float | None = None,
             meta: dict | None = None) -> SpeechHead:
    """A head on these clips that starts from base: base's basis and offsets, ridge toward base's weights."""
    if tuple(base.targets) != TARGETS:
        raise TrainError(f"the base speech model predicts {base.targets}, not {TARGETS}")
    strength = prior_strength(base) if strength is None else strength
    b = head_basis(base)
    stats = _sum(gram(b, c, base.offsets) for c in clips)
    return solve(b, stats, base.offsets, meta=dict(meta or {}, clips=len(clips), prior_strength=strength),
                 prior=(base.weights, strength))


def predict_at_frames(head: SpeechHead, clip: Clip) -> np.ndarray:
    """(m, T) head output at the clip's video frame times."""
    y = head.predict(clip.feats.astype(np.float32))
    idx = np.clip(np.rint(clip.times * whisper.FEATURE_RATE).astype(int), 0, len(y) - 1)
    return y[idx]


def pooled_corr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The judges' pooled correlation: each clip's two curves z-scored, then one correlation over all frames."""
    a, b = [], []
    for p, r in pairs:
        ok = np.isfinite(p) & np.isfinite(r)
        if ok.sum() < MIN_FRAMES or p[ok].std() < 1e-9 or r[ok].std() < 1e-9:
            continue
        a.append((p[ok] - p[ok].mean()) / p[ok].std())
        b.append((r[ok] - r[ok].mean()) / r[ok].std())
    if not a:
        return float("nan")
    return float(np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1])


def evaluate(head: SpeechHead, clips: list[Clip]) -> dict[str, float]:
    """Pooled correlation per target of head output vs measured mouth on these clips (lag 0)."""
    preds = [predict_at_frames(head, c) for c in clips]
    out = {"open": pooled_corr([(p[:, 0], c.raw_open) for p, c in zip(preds, clips)])}
    if "width" in head.targets:
        out["width"] = pooled_corr([(p[:, 1], c.y[:, 1]) for p, c in zip(preds, clips)])
    return out


def leave_speaker_out(clips: list[Clip], **kw) -> tuple[dict[str, float], list[tuple[str, int, float]]]:
    """Every speaker predicted by a head whose regression was fitted without them: (pooled figures,
    [(speaker, clips, own corr)]). The feature basis (standardisation, principal components: no mouth data) is
    computed once on all clips, so a fold costs one solve."""
    speakers = sorted({c.speaker for c in clips})
    if len(speakers) < 2:
        raise TrainError("leave-speaker-out needs clips of at least two speakers")
    base = kw.get("base")  # --from: every fold starts from the base head, as the final fit does
    b = head_basis(base) if base else basis(clips, kw.get("pca_dim", PCA_DIM))
    offsets = base.offsets if base else kw.get("offsets", OFFSETS)
    prior = (base.weights, prior_strength(base)) if base else None
    per = {s: _sum(gram(b, c, offsets) for c in clips if c.speaker == s) for s in speakers}
    total = _sum(per.values())
    pairs_o, pairs_w, rows = [], [], []
    for s in speakers:
        test = [c for c in clips if c.speaker == s]
        rest = tuple(t - p for t, p in zip(total, per[s]))
        head = solve(b, rest, offsets, kw.get("ridge", RIDGE), prior=prior)
        preds = [predict_at_frames(head, c) for c in test]
        po = [(p[:, 0], c.raw_open) for p, c in zip(preds, test)]
        pairs_o += po
        pairs_w += [(p[:, 1], c.y[:, 1]) for p, c in zip(preds, test)]
        rows.append((s, len(test), pooled_corr(po)))
    return {"open": pooled_corr(pairs_o), "width": pooled_corr(pairs_w)}, rows


def collect(dirs: list[Path], cache: Path | None, log=print) -> list[Clip]:
    found = find_clips(dirs)
    log(f"{len(found)} clips, {len({s for _, s in found})} speakers")
    encoder = whisper.load_encoder()
    clips, t0 = [], time.monotonic()
    for k, (p, spk) in enumerate(found):
        try:
            c = load_clip(p, spk, encoder, cache)
        except TrainError as exc:
            log(f"  skipped: {exc}")
            continue
        except Exception as exc:  # a broken file must not end a long run: named and skipped
            log(f"  skipped {p}: {type(exc).__name__}: {exc}")
            continue
        if c is not None:
            clips.append(c)
        if (k + 1) % 50 == 0:
            log(f"  {k + 1}/{len(found)} clips read ({time.monotonic() - t0:.0f} s)")
    if not clips:
        raise TrainError(f"no usable clip (a face in >= {MIN_FACE:.0%} of frames and an audio track) under "
                         f"{', '.join(map(str, dirs))}")
    return clips


def load_base(spec: str | None) -> tuple[SpeechHead | None, dict]:
    """--from: (the base head or None, its provenance for the new head's meta: name and content, no host path)."""
    if not spec:
        return None, {}
    path = SHIPPED if spec == "shipped" else Path(spec)
    base = load_head(path)
    return base, {"file": "shipped" if spec == "shipped" else path.name, "frames": base.meta.get("frames"),
                  "speakers": base.meta.get("speakers"), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def cli_train_speech(args) -> int:
    """train-speech --corpus DIR... --out FILE [--cache DIR] [--eval DIR...] [--from shipped|FILE]"""
    cache = Path(args.cache) if getattr(args, "cache", None) else None
    try:
        base, origin = load_base(getattr(args, "from_head", None))  # before the long read: a bad name fails fast
        clips = collect([Path(d) for d in args.corpus], cache)
        frames = sum(int(np.isfinite(c.y).all(1).sum()) for c in clips)
        speakers = sorted({c.speaker for c in clips})
        print(f"training on {len(clips)} clips, {len(speakers)} speakers, {frames} frames with a face")
        if len(speakers) >= 2:
            lso, rows = leave_speaker_out(clips, base=base)
            print(f"leave-speaker-out pooled correlation: open {lso['open']:.3f}, width {lso['width']:.3f}")
            for s, n, r in rows:
                print(f"  {s:40s} {n:4d} clips  open {r:+.3f}")
        else:
            lso = {}
            print("one speaker: no leave-speaker-out figure")
        meta = {"corpus": [Path(d).name for d in args.corpus], "speakers": len(speakers),  # no host paths
                "leave_speaker_out": lso, "whisper_sha256": whisper.MODEL_SHA256,
                "compute_type": whisper.COMPUTE_TYPE, "encoder_layers": whisper.ENCODER_LAYERS}
        if base is None:
            head = fit(clips, meta=meta)
        else:
            head = fit_from(base, clips, meta=dict(meta, started_from=origin))
            print(f"started from {origin['file']}: its basis, shrunk toward its weights "
                  f"(as strong as {head.meta['prior_strength']:.0f} frames of this footage)")
        for d in getattr(args, "eval", None) or []:
            ev = evaluate(head, collect([Path(d)], cache, log=lambda *a: None))
            print(f"on {d}: pooled correlation open {ev['open']:.3f}, width {ev['width']:.3f}")
    except (TrainError, HeadError, whisper.WhisperModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); use it with HEYGEM_SPEECH_MODEL={out}")
    print(json.dumps({"clips": len(clips), "speakers": len(speakers), "frames": frames}))
    return 0
