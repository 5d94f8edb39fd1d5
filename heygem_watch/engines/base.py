"""The engine interface: the one thing the pipeline asks of a lip-sync engine.

Data path (see docs/ARCHITECTURE.md):
    recording --audio.load_audio--> AudioTrack (16 kHz mono float32, on disk)
    AudioTrack --Engine.analyse_speech--> speech (engine-specific, once per recording)
    template file --template.load_template--> Template (frames + face track, cached in var/cache)
    Template --Engine.prepare_template--> state (engine-specific, once per template, may cache on disk)
    FrameJob stream --Engine.render--> frames (yuv420p or BGR) --media.VideoWriter--> MP4
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from heygem_watch.audio import AudioTrack
    from heygem_watch.template import Template


class FrameJob:
    """One output frame to render.

    index:          output frame number, 0-based
    time:           seconds from the start of the recording's audio (index / fps)
    template_index: template frame shown at this output frame (ping-pong mapped by the pipeline)
    yuv:            that template frame as the cache stores it, yuv420p (H * 3 / 2, W) uint8, a writable copy an
                    engine may draw on in place and return (None when the job was made from a BGR image)
    image:          the same frame as (H, W, 3) uint8 BGR, converted on first use (a 1080p frame costs ~2 ms; an
                    engine that draws on yuv never pays it); an engine may draw on it in place and return it
    """

    __slots__ = ("index", "time", "template_index", "yuv", "_image")

    def __init__(self, index: int, time: float, template_index: int, image: np.ndarray | None = None,
                 yuv: np.ndarray | None = None):
        if image is None and yuv is None:
            raise ValueError("a FrameJob needs the template frame: image (BGR) or yuv (yuv420p)")
        self.index, self.time, self.template_index = index, time, template_index
        self.yuv, self._image = yuv, image

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            import cv2

            self._image = cv2.cvtColor(self.yuv, cv2.COLOR_YUV2BGR_I420)
        return self._image

    @property
    def as_given(self) -> np.ndarray:
        """The frame as the job came (yuv420p when it has it, else BGR): what a frame left unchanged is."""
        return self.yuv if self.yuv is not None else self.image

    def region(self, rect) -> "FrameRegion":
        """The part of the frame an engine draws in, as BGR: rect=(x, y, w, h) grown to even edges and clipped to the
        frame. On a yuv420p job only those pixels are converted (a 1080p frame costs what the box costs); on a BGR
        job it is the whole image, at origin (0, 0). Draw on region.image, then put_back."""
        from heygem_watch import template_frames

        if self.yuv is None:
            h, w = self.image.shape[:2]
            return FrameRegion(self.image, (0, 0), template_frames.even_box(rect, w, h))
        h, w = self.yuv.shape[0] * 2 // 3, self.yuv.shape[1]
        box = template_frames.even_box(rect, w, h)
        return FrameRegion(template_frames.crop_bgr(template_frames.planes(self.yuv, w, h), box), box[:2], box)

    def put_back(self, region: "FrameRegion") -> np.ndarray:
        """The frame with region's image (drawn on) in it: yuv420p with the box written back, or the BGR image."""
        if self.yuv is None:
            return self.image
        from heygem_watch import template_frames

        h, w = self.yuv.shape[0] * 2 // 3, self.yuv.shape[1]
        template_frames.paste_bgr(template_frames.planes(self.yuv, w, h), region.box, region.image)
        return self.yuv


class FrameRegion:
    """What FrameJob.region gives: image (BGR), origin (x, y) of image in the frame (subtract it from frame
    coordinates), box (x0, y0, x1, y1) in the frame that put_back writes."""

    __slots__ = ("image", "origin", "box")

    def __init__(self, image: np.ndarray, origin: tuple[int, int], box: tuple[int, int, int, int]):
        self.image, self.origin, self.box = image, origin, box


class EngineError(RuntimeError):
    """An engine cannot work with this input (message names the reason)."""


class Engine(ABC):
    """A lip-sync engine. One instance lives as long as the daemon: models stay loaded between tasks."""

    name: str = "base"

    def analyse_speech(self, audio: "AudioTrack") -> Any:
        """Once per recording, shared by every template. Must not hold the whole audio if it is long."""
        return None

    def prepare_template(self, template: "Template") -> Any:
        """Once per template and process; may cache under template.cache_dir (survives restarts)."""
        return None

    @abstractmethod
    def render(self, template: "Template", state: Any, speech: Any, jobs: Iterable[FrameJob]) -> Iterator[np.ndarray]:
        """Yield exactly one frame per job, in job order, streaming (bounded memory): (H, W, 3) uint8 BGR (job.image
        drawn on) or yuv420p (H * 3 / 2, W) uint8 (job.yuv drawn on, no colour conversion of the whole frame).

        Frames whose template frame has no face must come back unchanged.
        """

    def ready(self) -> None:
        """Blocks until the engine's models are loaded: EngineError, naming the fix, when they cannot be (the daemon
        says so at start-up instead of at the first recording)."""

    def describe(self) -> dict:
        """What goes into manifests and logs (name, model, provider...)."""
        return {"engine": self.name}

    def close(self) -> None:
        pass
