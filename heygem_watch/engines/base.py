"""The engine interface: the one thing the pipeline asks of a lip-sync engine.

Data path (see docs/ARCHITECTURE.md):
    recording --audio.load_audio--> AudioTrack (16 kHz mono float32, on disk)
    AudioTrack --Engine.analyse_speech--> speech (engine-specific, once per recording)
    template file --template.load_template--> Template (frames + face track, cached in var/cache)
    Template --Engine.prepare_template--> state (engine-specific, once per template, may cache on disk)
    FrameJob stream --Engine.render--> BGR frames --media.VideoWriter--> MP4
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from heygem_watch.audio import AudioTrack
    from heygem_watch.template import Template


@dataclass
class FrameJob:
    """One output frame to render.

    index:          output frame number, 0-based
    time:           seconds from the start of the recording's audio (index / fps)
    template_index: template frame shown at this output frame (ping-pong mapped by the pipeline)
    image:          (H, W, 3) uint8 BGR copy of that template frame; an engine may draw on it in place
    """

    index: int
    time: float
    template_index: int
    image: np.ndarray


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
        """Yield exactly one (H, W, 3) uint8 BGR frame per job, in job order, streaming (bounded memory).

        Frames whose template frame has no face must come back unchanged.
        """

    def describe(self) -> dict:
        """What goes into manifests and logs (name, model, provider...)."""
        return {"engine": self.name}

    def close(self) -> None:
        pass
