"""The ONNX engine (a user's Wav2Lip-format model on onnxruntime), one module per stage:

    wav2lip.py    input/output conventions every Wav2Lip-format model shares
    mel.py        Wav2Lip mel spectrogram, streamed in chunks
    scrfd.py      optional SCRFD face detector for the crop boxes
    crop.py       face boxes per template frame, the model's 96x96 crop, the paste back into the frame
    engine.py     OnnxEngine: the Engine interface (engines/base.py): crops -> model -> paste-back
    checkpoint.py the published Wav2Lip network rebuilt in torch, a checkpoint loaded into it strictly
    export.py     `heygem-watch export-model`: checkpoint -> verified ONNX (needs the `export` extra)
    precision.py  fp16 / static int8 copies of an exported model (used by export.py)

The engine class is imported lazily so that exporting or computing a mel does not load the engine's imports.
"""
from __future__ import annotations

__all__ = ["OnnxEngine"]


def __getattr__(name: str):
    if name == "OnnxEngine":
        from heygem_watch.engines.onnx.engine import OnnxEngine

        return OnnxEngine
    raise AttributeError(name)
