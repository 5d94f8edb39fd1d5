#!/usr/bin/env python3
"""How well the speech head predicts real mouths before any rendering (pooled correlation, lag 0, as the judge).

    python bench/speech_corpus_eval.py [--corpus ../shared/corpus] [--media ../shared/media] [--cache DIR]

Clips are read exactly as `heygem-watch train-speech` reads them (face.TrackPool openness, Whisper features), cached.
Prints:
  1. shipped head (speech_head.npz, fitted on corpus/train only) on corpus/research (never trained on) and on the
     dev drivers: the head's raw output, and the full analysis (speech.analyse_speech: scaling, voice-activity gate)
  2. a head fitted on train + research (NOT shipped: research rights forbid it), each research speaker predicted by a
     head fitted without that speaker (leave-speaker-out), pooled over the research clips; same for the dev drivers
  3. own footage (--own TEMPLATE, default liveportrait_d6): the template's first 70 % fits a head, the last 25 %
     (after a 1 s gap) is predicted by the shipped head, the own-footage head, a head started from the shipped one
     and fitted on the own footage (`train-speech --from shipped`, what an operator can run), and a head on
     train + own footage (needs our corpus: an operator cannot run it).
  4. openings per syllable: how often a real mouth opens per second of speech, against the syllables (loudness
     peaks) in its audio, and the same count on the shipped head's full analysis of that audio (bench/
     render_fidelity.py's counts: what it reports for a rendered output, e.g. Mandarin, reads against these).
  5. inside a long stream: the clips' audio joined into one track (in a shuffled order, back to back or with 0.5 s
     of silence between), its features streamed as the engine streams a 2-hour recording's, each clip's stretch
     predicted by the shipped head and scored against its own mouth, beside the same clips analysed one by one;
     then the full analysis of the joined track (what the renderer is asked for in a long recording).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heygem_watch.engines.builtin import speech as S  # noqa: E402
from heygem_watch.engines.builtin import speech_train as T  # noqa: E402
from heygem_watch.engines.builtin import whisper as W  # noqa: E402
from heygem_watch.engines.builtin.head import load_head  # noqa: E402

DEV_DRIVERS = ("templates/videoretalking_face1.mp4", "templates/videoretalking_face3.mp4",
               "templates/videoretalking_face5.mp4", "drivers/lrs2_deep_avsr_00001.mp4",
               "drivers/styletalk_feifeili_clip1.mp4", "drivers/voxceleb_pcavs_00086.mp4")
OWN_TRAIN, OWN_GAP = 0.70, 1.0  # fraction of the template that fits the own head; seconds left out after it


def full_analysis(head, clip: T.Clip, encoder) -> np.ndarray:
    """speech.analyse_speech's open curve at the clip's frame times (what the renderer is asked for)."""
    audio, _ = T.decode_audio(clip.path)
    curve = S.analyse_speech(T.ArrayTrack(audio), head, encoder)
    return curve.sample(clip.times)[0]


def report(name: str, head, clips: list[T.Clip], encoder, full: bool = True) -> None:
    ev = T.evaluate(head, clips)
    line = f"  {name:44s} head open {ev['open']:.3f}  width {ev['width']:.3f}"
    if full:
        pooled = T.pooled_corr([(full_analysis(head, c, encoder), c.raw_open) for c in clips])
        line += f"  | full analysis open {pooled:.3f}"
    print(line + f"  ({len(clips)} clips)", flush=True)


def lso_on(extra: list[T.Clip], train: list[T.Clip]) -> float:
    """Each speaker of `extra` predicted by a regression fitted on train + the other speakers of extra (feature
    basis from all clips, as train-speech's leave-speaker-out)."""
    b = T.basis(train + extra)
    train_stats = T._sum(T.gram(b, c) for c in train)
    per = {s: T._sum(T.gram(b, c) for c in extra if c.speaker == s) for s in sorted({c.speaker for c in extra})}
    everything = T._sum([train_stats] + list(per.values()))
    pairs = []
    for spk, own in per.items():
        head = T.solve(b, tuple(t - o for t, o in zip(everything, own)))
        pairs += [(T.predict_at_frames(head, c)[:, 0], c.raw_open) for c in extra if c.speaker == spk]
    return T.pooled_corr(pairs)


def rates(head, clips: list[T.Clip], encoder) -> tuple[float, float, float, float]:
    """(syllables, real openings, analysed openings per second of speech, seconds of speech), pooled over clips."""
    from render_fidelity import loudness_db, opening_rate, syllable_rate

    syl = real = pred = speech_s = 0.0
    for c in clips:
        audio, _ = T.decode_audio(c.path)
        syl_hz, speech100 = syllable_rate(loudness_db(audio, S.SAMPLE_RATE))
        secs = speech100.sum() / 100
        at_frames = np.interp(c.times, (np.arange(len(speech100)) + 0.5) / 100, speech100.astype(float)) > 0.5
        curve = S.analyse_speech(T.ArrayTrack(audio), head, encoder).sample(c.times)[0]
        syl += syl_hz * secs
        real += opening_rate(c.raw_open, at_frames, secs) * secs
        pred += opening_rate(curve, at_frames, secs) * secs
        speech_s += secs
    return syl / speech_s, real / speech_s, pred / speech_s, speech_s


def joined(clips: list[T.Clip], gap_s: float, seed: int) -> tuple[np.ndarray, dict[int, int]]:
    """(one track of all the clips' audio, {clip index: encoder frame it starts on}): each clip's audio padded to
    whole encoder frames, so every clip starts on one; gap_s of silence after each; order shuffled by seed."""
    hop = W.SAMPLE_RATE // W.FEATURE_RATE
    parts, start, pos = [], {}, 0
    for k in np.random.default_rng(seed).permutation(len(clips)):
        audio, _ = T.decode_audio(clips[k].path)
        audio = np.concatenate([audio, np.zeros((-len(audio)) % hop + int(gap_s * W.FEATURE_RATE) * hop, np.float32)])
        start[k] = pos // hop
        parts.append(audio)
        pos += len(audio)
    return np.concatenate(parts), start


def in_stream(clips: list[T.Clip], encoder, audio: np.ndarray, start: dict[int, int]) -> list[T.Clip]:
    """The clips with the features of their stretch of one joined track (joined's audio and starts)."""
    feats = W.encode_all(T.ArrayTrack(audio), encoder)
    out = []
    for k, c in enumerate(clips):
        c = copy.copy(c)
        c.feats = feats[start[k]:start[k] + len(c.feats)]
        out.append(c)
    return out


def full_in_stream(head, clips: list[T.Clip], encoder, audio: np.ndarray, start: dict[int, int]) -> float:
    """Pooled correlation of the full analysis of one joined track (joined's audio and starts), each clip's stretch
    against its own mouth: what the renderer is asked for when the clips are one long recording."""
    curve = S.analyse_speech(T.ArrayTrack(audio), head, encoder)
    return T.pooled_corr([(curve.sample(c.times + start[k] / W.FEATURE_RATE)[0], c.raw_open)
                          for k, c in enumerate(clips)])


def split(clip: T.Clip, t0: float, t1: float) -> T.Clip:
    """The frames of clip in [t0, t1) (features stay whole: the encoder saw the whole clip, the fit does not)."""
    keep = (clip.times >= t0) & (clip.times < t1)
    c = copy.copy(clip)
    c.times, c.raw_open = clip.times[keep], clip.raw_open[keep]
    gap = clip.raw_open[keep]
    width = np.where(np.isfinite(clip.y[keep, 1]), clip.y[keep, 1], np.nan)
    c.y = T.normalise_targets(gap, width)
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus")
    ap.add_argument("--media", type=Path, default=ROOT.parent / "shared" / "media")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/speech_cache/clips2"))
    ap.add_argument("--own", default="templates/liveportrait_d6.mp4")
    args = ap.parse_args()
    enc = W.load_encoder()
    shipped = load_head()
    quiet = lambda *a: None  # noqa: E731
    train = T.collect([args.corpus / "train"], args.cache, log=quiet)
    research = T.collect([args.corpus / "research"], args.cache, log=quiet)
    dev = [c for c in (T.load_clip(args.media / p, Path(p).stem, enc, args.cache) for p in DEV_DRIVERS) if c]
    print(f"train {len(train)} clips, research {len(research)} clips "
          f"({len({c.speaker for c in research})} speakers), dev drivers {len(dev)}")
    print("1. shipped head (fitted on train only)")
    report("research (never trained on)", shipped, research, enc)
    report("dev drivers", shipped, dev, enc)
    print("2. head on train + research (not shipped), leave-speaker-out")
    print(f"  {'research':44s} head open {lso_on(research, train):.3f}")
    report("dev drivers (head on all train + research)", T.fit(train + research), dev, enc, full=False)
    own = T.load_clip(args.media / args.own, "own", enc, args.cache)
    if own is not None:
        end = float(own.times[-1])
        fit_part = split(own, 0.0, OWN_TRAIN * end)
        test_part = split(own, OWN_TRAIN * end + OWN_GAP, end + 1.0)
        print(f"3. own footage: {args.own}, fit on 0-{OWN_TRAIN * end:.1f} s, "
              f"predict {OWN_TRAIN * end + OWN_GAP:.1f}-{end:.1f} s")
        report("shipped head", shipped, [test_part], enc, full=False)
        report("head on own footage only", T.fit([fit_part]), [test_part], enc, full=False)
        report("head from shipped + own footage", T.fit_from(shipped, [fit_part]), [test_part], enc, full=False)
        report("head on train + own footage", T.fit(train + [fit_part] * 10), [test_part], enc, full=False)
    print("4. openings per second of speech (peaks >= a quarter of the curve's p5-p95 range) against syllables")
    groups = (("train/grid", [c for c in train if "/grid/" in str(c.path)]),
              ("train/pd", [c for c in train if "/pd/" in str(c.path)]), ("research", research), ("dev drivers", dev))
    for name, clips in groups:
        syl, real, pred, secs = rates(shipped, clips, enc)
        print(f"  {name:12s} syllables {syl:.2f}/s  real mouth {real:.2f}/s ({real / syl:.2f} per syllable)  "
              f"shipped head, full analysis {pred:.2f}/s ({pred / syl:.2f})  ({len(clips)} clips, {secs:.0f} s of speech)",
              flush=True)
    print("5. inside a long stream (shipped head): each clip alone, then in one joined track")
    for name, clips in (("research", research), ("dev drivers", dev)):
        alone = T.evaluate(shipped, clips)["open"]
        tracks = [joined(clips, gap, seed) for gap, seed in ((0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1))]
        heads = [T.evaluate(shipped, in_stream(clips, enc, *tr))["open"] for tr in tracks]
        print(f"  {name:12s} alone {alone:.3f}  joined back to back {heads[0]:.3f} / {heads[1]:.3f}  "
              f"with 0.5 s between {heads[2]:.3f} / {heads[3]:.3f}  (two orders each)", flush=True)
        full = [full_in_stream(shipped, clips, enc, *tr) for tr in tracks]
        print(f"  {'':12s} full analysis: joined back to back {full[0]:.3f} / {full[1]:.3f}  "
              f"with 0.5 s between {full[2]:.3f} / {full[3]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
