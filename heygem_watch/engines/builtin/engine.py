"""The built-in lip-sync engine: no model, CPU only, the person's own mouths re-timed to the speech.

    analyse_speech(track)      -> speech curve (engines/builtin/speech.py): Whisper encoder features (whisper.py) through
                                  the learned head (head.py, HEYGEM_SPEECH_MODEL), gated by voice activity (near
                                  speech the detector in vad.py hears: inside it, or loud in the mouth's band):
                                  wanted openness / width over time
    prepare_template(template) -> BuiltinState: mouth library (mouth.py, cached on disk) + lower-face mesh
    render(...)                -> per output frame: Selector picks a template frame whose mouth fits (temporally
                                  coherent), compose.compose_mouth draws it into the current frame at exactly the
                                  wanted opening, synthesising the interior when the template never opens that far.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np

from heygem_watch.engines.builtin.compose import MouthRig, compose_mouth
from heygem_watch.engines.base import Engine, EngineError, FrameJob
from heygem_watch.engines.builtin.mouth import MouthLibrary, Selector, analyse_mouths, descriptors, read_crop
from heygem_watch.engines.builtin.warp import crop_rect

OPEN_MIN = 0.18  # widest wanted opening (inner gap / iod) is at least this, even for a template that barely opens
OPEN_MAX = 0.28  # ...and at most this (wider looks like shouting)
WIDTH_GAIN = 0.10  # speech width -1..1 moves the mouth width by this fraction
RAW_TRACK_NAME = "track.npz"  # template.py's face-track file; its "raw" array is the unsmoothed track


@dataclass
class BuiltinState:
    lib: MouthLibrary
    rig: MouthRig
    open_hi: float  # wanted gap (iod) at speech openness 1
    width_mid: float  # the person's typical mouth width (iod)
    raw: np.ndarray | None = None  # (n, 478, 2) per-frame (unsmoothed) landmarks, when the template cache has them


class BuiltinEngine(Engine):
    name = "builtin"

    def __init__(self, speech_model: Path | None = None, speech_detector: bool = True, **options):
        from heygem_watch.engines.builtin.head import HeadError, load_head

        self.options = dict(options)
        # False (HEYGEM_SPEECH_DETECTOR=false): the mouth follows the voice band's loudness alone, so singing over
        # music moves it (the detector hears a song as music), and music alone does too
        self.speech_detector = bool(speech_detector)
        self.open_max = float(options.get("open_max", OPEN_MAX))
        self.frames_passed_through = 0  # frames left unchanged because drawing failed on them
        self.speech_model = Path(speech_model) if speech_model else None
        try:
            self.head = load_head(self.speech_model)
        except HeadError as exc:
            raise EngineError(str(exc)) from None
        # The Whisper model (~0.4 s to join, verify, cut and load) and the speech detector (vad.py) load beside whatever
        # comes next (the recording's audio extraction, a template's analysis); analyse_speech waits for them.
        self._encoder: dict = {}
        self._loader = threading.Thread(target=self._load_encoder, name="whisper-load", daemon=True)
        self._loader.start()

    def _load_encoder(self) -> None:
        from heygem_watch.vad import load_detector
        from heygem_watch.engines.builtin.whisper import load_encoder

        try:
            self._encoder["model"] = load_encoder()
            self._encoder["detector"] = load_detector() if self.speech_detector else False
        except Exception as exc:  # noqa: BLE001 - re-raised by analyse_speech, in the caller's thread
            self._encoder["error"] = exc

    def describe(self) -> dict:
        return {"engine": self.name, "model": None,
                "speech_model": self.speech_model.name if self.speech_model else "shipped",
                "speech_detector": self.speech_detector}

    def ready(self) -> None:
        """Waits for the background loader (Whisper, speech detector); a model it could not load raises here."""
        from heygem_watch.vad import VadModelError
        from heygem_watch.engines.builtin.whisper import WhisperModelError

        self._loader.join()
        if "error" in self._encoder:
            exc = self._encoder["error"]
            if isinstance(exc, (WhisperModelError, VadModelError)):
                raise EngineError(str(exc)) from None
            raise exc

    def analyse_speech(self, audio) -> Any:
        """Whisper features through the head (the encoder stays loaded for the engine's lifetime)."""
        from heygem_watch.engines.builtin.speech import analyse_speech
        from heygem_watch.logs import get_logger

        self.ready()
        t0, c0 = time.monotonic(), time.process_time()
        curve = analyse_speech(audio, self.head, self._encoder["model"], detector=self._encoder["detector"])
        get_logger().info("speech_analysed", audio_s=round(audio.n_samples / audio.sample_rate, 2),
                          seconds=round(time.monotonic() - t0, 3), cpu_s=round(time.process_time() - c0, 3),
                          speech_model=self.describe()["speech_model"])
        return curve

    def prepare_template(self, template) -> BuiltinState:
        lib = analyse_mouths(template)
        valid = np.flatnonzero(lib.valid)
        if len(valid) == 0:
            raise EngineError(f"{template.path}: no face in the template")
        # the mesh is built on a typical frame: median openness among the valid ones
        ref = valid[np.argsort(lib.openness[valid])[len(valid) // 2]]
        rig = MouthRig.from_shape(np.asarray(template.landmarks[ref], np.float64))
        _, hi = lib.open_range()
        return BuiltinState(lib, rig, float(np.clip(hi, OPEN_MIN, self.open_max)),
                            float(np.median(lib.width[valid])), _raw_landmarks(template))

    def targets(self, state: BuiltinState, speech, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Wanted (inner gap, width) in iod units at times (s)."""
        if speech is None:
            z = np.zeros(len(times))
            return z, z + state.width_mid
        o, w, c = speech.sample(np.asarray(times, np.float64))
        o = np.clip(np.asarray(o, np.float64), 0.0, 1.0) * (1.0 - np.clip(np.asarray(c, np.float64), 0.0, 1.0))
        return o * state.open_hi, state.width_mid * (1.0 + WIDTH_GAIN * np.clip(np.asarray(w, np.float64), -1, 1))

    def render(self, template, state: BuiltinState, speech, jobs: Iterable[FrameJob]) -> Iterator[np.ndarray]:
        if state is None:
            state = self.prepare_template(template)
        sel = Selector(state.lib)
        pending: deque = deque()
        lms = template.landmarks
        found = np.asarray(template.face_found, bool)
        for job in jobs:
            gap, width = self.targets(state, speech, np.array([job.time]))
            ti = job.template_index
            pose = descriptors(np.asarray(lms[ti], np.float64))[3:5] if found[ti] else None
            pending.append((job, float(gap[0]), float(width[0])))
            for s in sel.push(float(gap[0]), float(width[0]), pose):
                yield self._draw(template, state, pending.popleft(), s)
        for s in sel.flush():
            yield self._draw(template, state, pending.popleft(), s)
        while pending:  # only when the selector had nothing to decide (cannot happen with a valid library)
            yield pending.popleft()[0].as_given

    def _draw(self, template, state: BuiltinState, item, s: int) -> np.ndarray:
        """The job's frame with the mouth of template frame s drawn in, on job.region: on a yuv420p job only the box
        the mouth is drawn in is converted to BGR and back, the rest stays the template's own bytes (a 1080x1920
        frame costs what its mouth costs; converting whole frames took ~2.7 ms of CPU each)."""
        job, gap, width = item
        ti = job.template_index
        if not template.face_found[ti] or not np.isfinite(template.landmarks[ti]).all():
            return job.as_given
        cur_lm = np.asarray(template.landmarks[ti], np.float64)
        rect = crop_rect(state.rig.box_points(cur_lm), template.width, template.height)
        if rect[2] < 8 or rect[3] < 8:
            return job.as_given  # (compose_mouth draws nothing in a box this small either)
        region = job.region(rect)
        # the region's own coordinates: compose_mouth finds the same box in it, and reads and writes nothing outside
        # it (its warps sample inside the box)
        shift = np.array(region.origin, np.float64)
        cur_lm = cur_lm - shift
        raw = state.raw
        cur_px = None if raw is None else np.asarray(raw[ti], np.float64) - shift
        if s == ti:
            src, src_lm, src_px = region.image, cur_lm, cur_px
        else:
            src, src_lm = partial(read_crop, template, s), np.asarray(template.landmarks[s], np.float64)
            src_px = None if raw is None else raw[s]
        try:
            compose_mouth(region.image, cur_lm, src, src_lm, state.rig, gap, width, state.lib.teeth_bgr,
                          cur_px=cur_px, src_px=src_px)
        except (ValueError, IndexError, ArithmeticError, np.linalg.LinAlgError, cv2.error):
            # degenerate landmarks on one frame: show it as it is rather than lose the whole video (compose_mouth
            # writes into the image only at its very end, and the region is put back only after it)
            self.frames_passed_through += 1
            return job.as_given
        return job.put_back(region)


def _raw_landmarks(template) -> np.ndarray | None:
    """The unsmoothed face track the template cache keeps beside the smoothed one (track.npz, key "raw"), or None.
    The warps sample pixels where this frame's lips really are (see compose.compose_mouth)."""
    try:
        with np.load(Path(template.cache_dir) / RAW_TRACK_NAME) as z:
            raw = z["raw"].astype(np.float32)
    except (OSError, KeyError, ValueError, EOFError):
        return None
    return raw if raw.shape == np.shape(template.landmarks) else None
