#!/usr/bin/env python3
"""Does the rendered mouth shut on m/b/p and open on vowels?  (English recordings: word-initial letters)

Reads the renders bench/render_fidelity.py left in --work (each pair's curves.npz: target and rendered openness per
output frame, and the files it came from). Whisper base (the engine's own speech front end model) transcribes each
recording and aligns its words in time (CTranslate2 generate + align: cross-attention, about +-40 ms). Then for
every word that starts with m, b or p (not "ph") it takes the least open the mouth gets in WINDOW_BILABIAL around
the word's start, and for every word that starts with a vowel letter the most open it gets in WINDOW_VOWEL after
it, each over that curve's own 90th percentile (1 = as open as its usual wide opening). Printed per word and
pooled, for the target curve, the rendered mouth, and the real speaker's mouth when the recording has a face
(measured with the project's FaceMesh): a mouth that shuts on bilabials scores near 0 there, near 1 on vowels.

  PYTHONPATH=. .venv/bin/python bench/mouth_phones.py [--work /tmp/render_fidelity]
"""
from __future__ import annotations

import argparse
import glob
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from heygem_watch import face  # noqa: E402
from heygem_watch.audio import extract_audio  # noqa: E402
from heygem_watch.media import iter_video_frames, probe  # noqa: E402

WINDOW_BILABIAL = (-0.08, 0.06)  # s around a word's aligned start: the lips close before the burst / nasal
WINDOW_VOWEL = (0.0, 0.16)  # s after it: the vowel's opening
ALIGN_RATE = 50  # alignment steps per second (Whisper encoder frames)


class Aligner:
    """Whisper base transcription + word alignment (the model files the engine ships, verified)."""

    def __init__(self):
        import ctranslate2

        from heygem_watch.engines.builtin import whisper as w

        self.w, self.ct2 = w, ctranslate2
        files = {k: bytes(v) for k, v in w.model_files().items()}  # CTranslate2 takes bytes, not model.bin's view
        self.model = ctranslate2.models.Whisper("whisper-base", device="cpu", compute_type="float32", files=files)
        self.vocab = files["vocabulary.txt"].decode().split("\n")
        self.ids = {t: i for i, t in enumerate(self.vocab)}

    def words(self, media: Path) -> list[tuple[str, float]]:
        """[(word, start s)] of the first 30 s of a recording's speech."""
        w = self.w
        with tempfile.TemporaryDirectory() as d:
            track = extract_audio(media, Path(d))
            n = min(w.n_mel_frames(track.n_samples), 3000)
            mel = w.scale_mel(w.log_mel_block(track, 0, n), w.log_mel_peak(track))
        x = np.full((w.N_MELS, 3000), mel.min(), np.float32)
        x[:, :n] = mel[:, :n]
        feats = self.ct2.StorageView.from_array(x[None])
        sot = [self.ids[t] for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
        eot = self.ids["<|endoftext|>"]
        tokens = [i for i in self.model.generate(feats, [sot], beam_size=1)[0].sequences_ids[0] if i < eot]
        if not tokens:
            return []
        start: dict[int, int] = {}
        for ti, fi in self.model.align(feats, sot, [tokens], [n])[0].alignments:
            start.setdefault(ti, fi)
        out: list[list] = []
        for k, i in enumerate(tokens):
            s = self.vocab[i]
            if s.startswith("Ġ") or not out:  # byte-level BPE: "Ġ" starts a new word
                out.append([s.lstrip("Ġ"), start.get(k, 0) / ALIGN_RATE])
            else:
                out[-1][0] += s
        return [(a, float(b)) for a, b in out]


def real_openness(media: Path, fps: float, n: int) -> np.ndarray | None:
    """The recording's own speaker's openness at the output frame times, or None without a face video."""
    try:
        if not probe(media).has_video:
            return None
    except Exception:
        return None
    opn = []
    with face.FaceMesh(static_image=False) as mesh:
        for img in iter_video_frames(media):
            lm = mesh.detect(img)
            opn.append(np.nan if lm is None else float(face.mouth_openness(lm)))
    o = np.asarray(opn)
    ok = np.isfinite(o)
    if ok.mean() < 0.9:
        return None
    src_fps = float(probe(media).fps)
    o = np.interp(np.arange(len(o)), np.flatnonzero(ok), o[ok])
    return np.interp(np.arange(n) / fps, np.arange(len(o)) / src_fps, o)


def kind(word: str) -> str | None:
    w = word.lower().lstrip("\"'(")
    if w[:1] in ("m", "b", "p") and not w.startswith("ph"):
        return "bilabial"
    if w[:1] in ("a", "e", "i", "o", "u"):
        return "vowel"
    return None


def score(curve: np.ndarray, fps: float, t: float, k: str) -> float:
    lo, hi = WINDOW_BILABIAL if k == "bilabial" else WINDOW_VOWEL
    seg = curve[max(0, int(np.floor((t + lo) * fps))):max(0, int(np.ceil((t + hi) * fps)) + 1)]
    if not len(seg):
        return float("nan")
    return float((seg.min() if k == "bilabial" else seg.max()) / (np.percentile(curve, 90) + 1e-9))


def main(argv=None) -> int:
    from heygem_watch import logs

    logs.configure("console", "warning", sys.stderr)  # the engine's info events would interleave with the table
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/render_fidelity")
    a = ap.parse_args(argv)
    aligner = Aligner()
    pooled: dict[str, dict[str, list]] = {k: {"target": [], "rendered": [], "real": []} for k in ("bilabial", "vowel")}
    for f in sorted(glob.glob(str(Path(a.work) / "*" / "curves.npz"))):
        z = np.load(f)
        if "driving" not in z:
            continue
        drv, fps = Path(str(z["driving"])), float(z["fps"])
        rendered = z["rendered"].astype(np.float64)
        ok = np.isfinite(rendered)
        rendered = np.interp(np.arange(len(rendered)), np.flatnonzero(ok), rendered[ok])
        curves = {"target": z["target"].astype(np.float64), "rendered": rendered}
        real = real_openness(drv, fps, len(rendered))
        if real is not None:
            curves["real"] = real
        name = Path(f).parent.name
        for word, t in aligner.words(drv):
            k = kind(word)
            if k is None or t < 0.05:
                continue
            vals = {c: score(v, fps, t, k) for c, v in curves.items()}
            for c, v in vals.items():
                pooled[k][c].append(v)
            print(f"{name[:48]:48s} {k:8s} {word:14s} {t:5.2f} s  " + "  ".join(f"{c} {v:.2f}" for c, v in vals.items()))
    for k, d in pooled.items():
        print(f"{k:8s} n {len(d['rendered']):3d}  " + "  ".join(f"{c} {np.nanmean(v):.2f}" for c, v in d.items() if v)
              + ("  (min over the word start / p90)" if k == "bilabial" else "  (max after the word start / p90)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
