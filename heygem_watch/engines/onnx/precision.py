"""Lower-precision copies of an exported Wav2Lip ONNX model: fp16 for GPUs, static int8 for CPUs.

Used by export.py (`heygem-watch export-model --fp16 / --int8`). int8 calibration needs realistic inputs:
crops of a real face photo (the public-domain photo inside matplotlib's wheel, boxed by MediaPipe like a template)
with mel windows of a synthetic voiced signal; see calibration_inputs.
Shapes: audio (B, 1, 80, 16) float32 mel window; face (B, 6, 96, 96) float32 BGR/255.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from heygem_watch.engines.onnx.wav2lip import FACE_SIZE, MEL_BANDS, MEL_STEP

CALIB_BATCHES = 8  # batches of 4 calibration_inputs the int8 calibration sees


def calibration_inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
    """Realistic inputs for int8 calibration and checks: jittered crops of a real face photo (the public-domain
    photo shipped with matplotlib, boxed by MediaPipe like a template) or smooth image-like noise when it is not
    available, with mel windows of a synthetic voiced signal and some silence."""
    from heygem_watch.engines.onnx import mel

    rng = np.random.default_rng(seed)
    feeds = {"audio": np.full((batch, 1, MEL_BANDS, MEL_STEP), -4.0, np.float32),
             "face": np.zeros((batch, 6, FACE_SIZE, FACE_SIZE), np.float32)}
    t = np.arange(16000) / 16000
    for b in range(batch):
        feeds["face"][b] = _photo_crop(rng)
        if rng.uniform() < 0.85:  # else silence: the floor value everywhere, as between sentences
            f0 = rng.uniform(90, 260)
            voice = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 12))
            voice *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)
            x = rng.uniform(0.05, 0.5) * voice + rng.normal(0, 0.01, len(t))
            cols = mel.mel_of_array(x.astype(np.float32))
            s0 = int(rng.integers(0, cols.shape[1] - MEL_STEP))
            feeds["audio"][b, 0] = cols[:, s0:s0 + MEL_STEP]
    return feeds


_PHOTO: list = []


def _photo_crop(rng) -> np.ndarray:
    """(6, 96, 96) model input from the sample face photo, randomly shifted, scaled, lit and mirrored."""
    import cv2

    from heygem_watch.engines.onnx.crop import crop_input

    if not _PHOTO:
        _PHOTO.append(_load_photo())
    photo = _PHOTO[0]
    if photo is None:
        img = cv2.resize(rng.uniform(0, 1, (6, 6, 3)).astype(np.float32), (FACE_SIZE, FACE_SIZE),
                         interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).transpose(2, 0, 1)
        out = np.concatenate([img, img]).astype(np.float32)
        out[:3, FACE_SIZE // 2:] = 0
        return out
    img, (x1, y1, x2, y2) = photo
    w, h = x2 - x1, y2 - y1
    dx, dy = rng.uniform(-0.05, 0.05, 2) * (w, h)
    g = rng.uniform(-0.04, 0.04)
    box = np.array([x1 + dx - g * w, y1 + dy - g * h, x2 + dx + g * w, y2 + dy + g * h]).round().astype(int)
    box = np.clip(box, 0, [img.shape[1], img.shape[0], img.shape[1], img.shape[0]])
    lit = cv2.convertScaleAbs(img, alpha=rng.uniform(0.8, 1.2), beta=rng.uniform(-15, 15))
    out = crop_input(lit, box)
    return out[:, :, ::-1].copy() if rng.uniform() < 0.5 else out


def _load_photo():
    try:
        import cv2
        import matplotlib.cbook as cbook

        from heygem_watch import face
        from heygem_watch.engines.onnx.crop import face_boxes

        img = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), cv2.IMREAD_COLOR)
        with face.FaceMesh(static_image=True) as mesh:
            lm = mesh.detect(img)
        if lm is None:
            return None
        boxes, valid = face_boxes(lm[None], np.array([True]), img.shape[1], img.shape[0])
        return (img, tuple(int(v) for v in boxes[0])) if valid[0] else None
    except Exception:  # noqa: BLE001 - any failure falls back to smooth noise
        return None


def to_fp16(src: os.PathLike | str, dst: os.PathLike | str) -> None:
    """fp16 weights and arithmetic inside; inputs and output stay float32 (Cast at the edges)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16)))
        if node.op_type == "Cast":  # a cast to float32 inside the graph would undo the conversion
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
    casts_in = []
    for inp in g.input:
        h = inp.name + "_fp16"
        for node in g.node:
            node.input[:] = [h if x == inp.name else x for x in node.input]
        casts_in.append(helper.make_node("Cast", [inp.name], [h], to=TensorProto.FLOAT16))
    out = g.output[0]
    h = out.name + "_fp16"
    for node in g.node:
        node.output[:] = [h if x == out.name else x for x in node.output]
    cast_out = helper.make_node("Cast", [h], [out.name], to=TensorProto.FLOAT)
    nodes = casts_in + list(g.node) + [cast_out]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # intermediate types changed; let the runtime infer them
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def to_int8(src: os.PathLike | str, dst: os.PathLike | str, work: Path) -> str:
    """Static int8 quantization (QDQ, per-channel weights, MinMax-calibrated on calibration_inputs).

    Static beat dynamic (ConvInteger) clearly on a 2-core AVX2 box: see docs/onnx.md. reduce_range keeps u8*s8
    sums from saturating on CPUs without VNNI. Returns a description of the method for the sidecar.
    """
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([calibration_inputs(4, 1000 + i) for i in range(CALIB_BATCHES)])

        def get_next(self):
            return next(self.batches, None)

    pre = work / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return "static QDQ, per-channel int8 weights, uint8 activations (reduce_range)"
