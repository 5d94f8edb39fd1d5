"""The speech head: Whisper encoder features (+- a few frames of context) -> per-frame mouth targets, numpy only.

    head = load_head(path or None)             None = the shipped weights (speech_head.npz beside this module)
    y = head.predict(feats)                    feats (n, DIM) -> (n, len(head.targets)) float32
    for f0, y in head.predict_stream(blocks):  the same, block by block (bounded memory)

A ridge regression: features standardised, projected on their first principal components, stacked over OFFSETS
(encoder frames, 20 ms each; future frames let the mouth lead its sound, the lead is learned), times weights.
Targets are per-clip normalised mouth measures (see speech_train.py): open 0 = this speaker shut .. 1 = wide open;
width -1 narrow/rounded .. +1 spread. The file is a plain .npz (no pickles): arrays plus a JSON `meta` string.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SHIPPED = Path(__file__).with_name("speech_head.npz")
FORMAT = "heygem-speech-head/1"
KEYS = ("mean", "scale", "proj", "offsets", "weights", "bias")


class HeadError(ValueError):
    """A speech head file that cannot be used (message names the file and the reason)."""


@dataclass
class SpeechHead:
    mean: np.ndarray  # (DIM,) feature mean
    scale: np.ndarray  # (DIM,) feature standard deviation
    proj: np.ndarray  # (DIM, P) principal components
    offsets: np.ndarray  # (K,) int encoder-frame offsets of the context
    weights: np.ndarray  # (K * P, T)
    bias: np.ndarray  # (T,)
    targets: tuple[str, ...] = ("open",)
    meta: dict = field(default_factory=dict)

    @property
    def context(self) -> tuple[int, int]:
        """(frames before, frames after) a prediction needs."""
        return max(0, -int(self.offsets.min())), max(0, int(self.offsets.max()))

    def project(self, feats: np.ndarray) -> np.ndarray:
        """(n, DIM) encoder features -> (n, P) standardised principal components."""
        return ((np.asarray(feats, np.float32) - self.mean) / self.scale) @ self.proj

    def predict_projected(self, z: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Targets for frames lo..hi-1 of z (n, P); context beyond z's ends repeats its edge frames."""
        n = len(z)
        hi = n if hi is None else hi
        out = np.tile(self.bias.astype(np.float32), (max(0, hi - lo), 1))
        if hi <= lo:
            return out
        idx = np.arange(lo, hi)
        p = z.shape[1]
        for k, off in enumerate(self.offsets):
            out += z[np.clip(idx + int(off), 0, n - 1)] @ self.weights[k * p:(k + 1) * p]
        return out

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """(n, DIM) -> (n, T) float32, one-shot."""
        return self.predict_projected(self.project(feats))

    def predict_stream(self, blocks: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
        """(f0, feats) blocks in order (whisper.encode_stream) -> (f0, targets) blocks; equal to predict() on the
        concatenation: frames wait until their future context has arrived."""
        before, after = self.context
        buf = np.zeros((0, self.proj.shape[1]), np.float32)
        buf0 = done = 0  # frame number of buf[0]; frames emitted so far
        for f0, feats in blocks:
            if f0 != buf0 + len(buf):
                raise ValueError(f"feature blocks out of order: got frame {f0}, expected {buf0 + len(buf)}")
            buf = np.concatenate([buf, self.project(feats)])
            ready = buf0 + len(buf) - after
            if ready > done:
                yield done, self._predict_window(buf, buf0, done, ready)
                done = ready
            keep_from = max(buf0, done - before)
            buf, buf0 = buf[keep_from - buf0:], keep_from
        if buf0 + len(buf) > done:
            yield done, self._predict_window(buf, buf0, done, buf0 + len(buf), at_end=True)

    def _predict_window(self, z, z0, lo, hi, at_end=False):
        """Frames lo..hi-1 (absolute) from buffer z holding frames z0.. . Context is padded with edge frames only
        where the buffer reaches the recording's real start/end, as predict() does, so streaming equals one-shot."""
        before, after = self.context
        left = z[:1].repeat(before, 0) if z0 == 0 else np.zeros((0, z.shape[1]), z.dtype)
        right = z[-1:].repeat(after, 0) if at_end else np.zeros((0, z.shape[1]), z.dtype)
        zz = np.concatenate([left, z, right])
        off = len(left) - z0
        return self.predict_projected(zz, lo + off, hi + off)

    def save(self, path: os.PathLike | str) -> None:
        meta = dict(self.meta, format=FORMAT, targets=list(self.targets))
        with open(path, "wb") as f:  # an open file: np.savez would append .npz to a name without it
            np.savez(f, mean=self.mean.astype(np.float32), scale=self.scale.astype(np.float32),
                     proj=self.proj.astype(np.float32), offsets=self.offsets.astype(np.int32),
                     weights=self.weights.astype(np.float32), bias=self.bias.astype(np.float32),
                     meta=np.array(json.dumps(meta, sort_keys=True)))


def load_head(path: os.PathLike | str | None = None) -> SpeechHead:
    """A head saved by SpeechHead.save (speech_train.py); None = the shipped one."""
    path = Path(path) if path else SHIPPED
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in KEYS}
            meta = json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise HeadError(f"{path}: speech model not found (HEYGEM_SPEECH_MODEL)") from None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise HeadError(f"{path}: not a speech model from `heygem-watch train-speech` ({exc})") from None
    if meta.get("format") != FORMAT:
        raise HeadError(f"{path}: unknown speech model format {meta.get('format')!r} (want {FORMAT})")
    from heygem_watch.engines.builtin.whisper import ENCODER_LAYERS

    # heads from train-speech before encoder_layers was recorded were fitted on all 6 layers' features
    layers = meta.get("encoder_layers", 6 if "whisper_sha256" in meta else ENCODER_LAYERS)
    if layers != ENCODER_LAYERS:
        raise HeadError(f"{path}: fitted on the features of {layers} Whisper encoder layers, this version computes "
                        f"them from {ENCODER_LAYERS}: fit it again with `heygem-watch train-speech`")
    d, p = arrays["proj"].shape
    k, t = len(arrays["offsets"]), len(arrays["bias"])
    if arrays["mean"].shape != (d,) or arrays["scale"].shape != (d,) or arrays["weights"].shape != (k * p, t) \
            or len(meta.get("targets", ())) != t or not all(np.isfinite(a).all() for a in arrays.values()):
        raise HeadError(f"{path}: speech model arrays have inconsistent shapes or non-finite values")
    return SpeechHead(**arrays, targets=tuple(meta["targets"]), meta=meta)
