"""Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth) -> ONNX, verified against torch (needs the `export` extra).

    heygem-watch export-model CHECKPOINT.pth models/NAME.onnx [--opset N] [--fp16] [--int8]

The checkpoint is loaded strictly into the rebuilt network (checkpoint.py), exported with a dynamic batch axis, and
run once through onnxruntime against torch on random input. NAME.json beside the model records the input conventions the engine
follows (crop size, colour order, mel window, box padding), so nothing is guessed at render time.

Inputs:  audio (B, 1, 80, 16) float32 mel window;  face (B, 6, 96, 96) float32 BGR/255, masked crop + reference.
Output:  out (B, 3, 96, 96) float32 BGR in [0, 1].
torch is imported inside the functions: the rest of the package never needs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from heygem_watch.engines.onnx.checkpoint import ExportError, load_checkpoint
from heygem_watch.engines.onnx.wav2lip import BOX_PADS, BOX_SMOOTH, FACE_SIZE, MEL_BANDS, MEL_STEP

DEFAULT_OPSET = 17
INPUT_NAMES = ("audio", "face")
OUTPUT_NAME = "out"
FP32_TOL = 1e-4  # max |onnx - torch| accepted for the fp32 export
FP16_TOL = 2e-2  # fp16 / int8 are reported against the fp32 graph with looser bounds (output range 0..1)
INT8_TOL = 0.25
INT8_MEAN_TOL = 0.02
CHECK_BATCH = 3  # random samples in the numerical check (not 1: exercises the dynamic batch axis)


def sidecar_path(model_path: os.PathLike | str) -> Path:
    """models/NAME.onnx -> models/NAME.json."""
    return Path(model_path).with_suffix(".json")


def conv_only(model):
    """A copy of the network that computes the same function with Conv layers only (what gets exported).

    Each ConvTranspose2d (+ its BatchNorm) becomes regular convolutions with the BatchNorm folded in: stride 2 as
    four sub-pixel phase convolutions (1x1, 1x2, 2x1 and 2x2 taps of the 3x3 kernel, exactly the original
    multiply-adds) interleaved by DepthToSpace; stride 1 as one convolution with the flipped kernel. onnxruntime
    runs Conv faster than ConvTranspose on CPU and can quantize it to int8 (it cannot quantize ConvTranspose).
    The export check compares this graph against the original module, so any slip here fails the export.
    """
    import copy

    import torch
    from torch import nn
    from torch.nn import functional as F

    taps = {0: [1], 1: [2, 0]}  # output phase -> kernel taps (input offsets 0, +1) for k=3, stride 2, pad 1

    class Phases(nn.Module):
        def __init__(self, unit):
            super().__init__()
            ct, bn = unit.conv_block[0], unit.conv_block[1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias + (ct.bias - bn.running_mean) * scale
            w = ct.weight.detach() * scale.detach()[None, :, None, None]  # (cin, cout, 3, 3)
            self.stride = ct.stride[0]
            self.convs = nn.ModuleList()
            if self.stride == 1:  # 1x1 -> 3x3 (decoder block 1): a convolution with the flipped kernel
                c = nn.Conv2d(ct.in_channels, ct.out_channels, 3, 1, 2 - ct.padding[0])
                c.weight.data = w.flip(2, 3).transpose(0, 1).contiguous()
                c.bias.data = shift.detach().clone()
                self.convs.append(c)
            else:
                for ry in (0, 1):
                    for rx in (0, 1):
                        k = w[:, :, taps[ry]][:, :, :, taps[rx]].transpose(0, 1).contiguous()
                        c = nn.Conv2d(ct.in_channels, ct.out_channels, tuple(k.shape[2:]), 1, 0)
                        c.weight.data, c.bias.data = k, shift.detach().clone()
                        self.convs.append(c)

        def forward(self, x):
            if self.stride == 1:
                return F.relu(self.convs[0](x))
            b, _, h, w = x.shape
            outs = [self.convs[0](x), self.convs[1](F.pad(x, (0, 1, 0, 0))),
                    self.convs[2](F.pad(x, (0, 0, 0, 1))), self.convs[3](F.pad(x, (0, 1, 0, 1)))]
            y = torch.stack(outs, 2).reshape(b, -1, h, w)  # channel c*4 + phase, the order pixel_shuffle wants
            return F.relu(F.pixel_shuffle(y, 2))

    out = copy.deepcopy(model)
    for block in getattr(out, "face_decoder_blocks", []):
        for i, unit in enumerate(block):
            if isinstance(unit.conv_block[0], nn.ConvTranspose2d):
                block[i] = Phases(unit)
    return out.eval()


def export_onnx(model, out_path: os.PathLike | str, opset: int = DEFAULT_OPSET) -> None:
    """torch -> ONNX fp32 with a dynamic batch axis on every input and the output."""
    import torch

    audio = torch.randn(2, 1, MEL_BANDS, MEL_STEP)
    face = torch.rand(2, 6, FACE_SIZE, FACE_SIZE)
    axes = {n: {0: "batch"} for n in (*INPUT_NAMES, OUTPUT_NAME)}
    import warnings

    import onnx

    model = conv_only(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant-folding chatter about Slice steps; the check below is what counts
        # the TorchScript exporter: no onnxscript dependency, folds BatchNorm into the convolutions
        torch.onnx.export(model, (audio, face), str(out_path), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    m = onnx.load(str(out_path))
    if _inline_identities(m):
        onnx.save(m, str(out_path))


def _inline_identities(m) -> int:
    """The exporter shares equal tensors (the phase convolutions' biases) through Identity nodes; give each user
    its own initializer so the quantizer sees plain Conv weights and biases. Returns the nodes removed."""
    from onnx import numpy_helper

    g = m.graph
    inits = {i.name: i for i in g.initializer}
    ident = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    if not ident:
        return 0
    outputs = {o.name for o in g.output}
    for out, src in list(ident.items()):
        if out in outputs:
            del ident[out]
            continue
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[src]), out))
    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in ident)]
    del g.node[:]
    g.node.extend(keep)
    return len(ident)


def random_inputs(batch: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs in the ranges real data has: mel in [-4, 4], faces in [0, 1] with the lower half of 0-2 masked."""
    rng = np.random.default_rng(seed)
    audio = rng.uniform(-4, 4, (batch, 1, MEL_BANDS, MEL_STEP)).astype(np.float32)
    face = rng.uniform(0, 1, (batch, 6, FACE_SIZE, FACE_SIZE)).astype(np.float32)
    face[:, :3, FACE_SIZE // 2:] = 0
    return {"audio": audio, "face": face}


def run_onnx(path: os.PathLike | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], feeds)[0]


def torch_forward(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(feeds["audio"]), torch.from_numpy(feeds["face"])).numpy()


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def export_checkpoint(checkpoint: os.PathLike | str, output: os.PathLike | str, *, opset: int = DEFAULT_OPSET,
                      precision: str = "fp32", log=print) -> dict:
    """Full export: load, export, verify, write OUTPUT (+ OUTPUT.json). Returns the sidecar dict.

    Raises ExportError when the checkpoint is wrong or the check fails (nothing is left at OUTPUT then).
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"unknown precision {precision!r}")
    from heygem_watch.engines.onnx.precision import calibration_inputs, to_fp16, to_int8  # fp16/int8 conversion lives there
    if output.suffix.lower() != ".onnx":
        raise ExportError(f"{output}: the output name must end in .onnx")
    t0 = time.monotonic()
    model = load_checkpoint(checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {checkpoint} ({n_params / 1e6:.1f} M parameters)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        work = Path(tmp)
        fp32 = work / "fp32.onnx"
        export_onnx(model, fp32, opset)
        feeds = random_inputs(CHECK_BATCH, seed=7)
        ref = torch_forward(model, feeds)
        got32 = run_onnx(fp32, feeds)
        diff32 = float(np.abs(got32 - ref).max())
        log(f"fp32 ONNX vs torch on random input (batch {CHECK_BATCH}): max abs diff {diff32:.2e}")
        if not diff32 < FP32_TOL:
            raise ExportError(f"{checkpoint}: ONNX output differs from torch by {diff32:.2e} (limit {FP32_TOL:.0e})")
        result, method, diff = fp32, "fp32", diff32
        if precision == "fp16":
            result, method = work / "fp16.onnx", "fp16 weights and arithmetic, float32 inputs/output"
            to_fp16(fp32, result)
        elif precision == "int8":
            result = work / "int8.onnx"
            method = to_int8(fp32, result, work)
        if precision != "fp32":
            real = calibration_inputs(CHECK_BATCH * 2, seed=99)  # faces + voice, not seen in calibration
            for name, f, ref32 in (("random", feeds, got32), ("face-like", real, run_onnx(fp32, real))):
                got = run_onnx(result, f)
                diff, mean = float(np.abs(got - ref32).max()), float(np.abs(got - ref32).mean())
                log(f"{precision} ONNX vs fp32 ONNX on {name} input: max abs diff {diff:.2e}, mean {mean:.2e} "
                    "(output range 0..1)")
            tol, mean_tol = (FP16_TOL, FP16_TOL) if precision == "fp16" else (INT8_TOL, INT8_MEAN_TOL)
            if not (diff < tol and mean < mean_tol):
                raise ExportError(f"{checkpoint}: {precision} model differs from fp32 by {diff:.2e} max, "
                                  f"{mean:.2e} mean on face-like input (limits {tol}, {mean_tol})")
        meta = {
            "format": "wav2lip",
            "precision": precision,
            "quantization": method,
            "inputs": {"audio": [None, 1, MEL_BANDS, MEL_STEP], "face": [None, 6, FACE_SIZE, FACE_SIZE]},
            "output": {OUTPUT_NAME: [None, 3, FACE_SIZE, FACE_SIZE]},
            "face_size": FACE_SIZE,
            "color_order": "BGR",
            "pixel_scale": 1 / 255,
            "face_channels": "0-2 crop with rows [size/2, size) zeroed, 3-5 reference crop (same frame)",
            "mel": {"sample_rate": 16000, "bands": MEL_BANDS, "window": MEL_STEP, "columns_per_second": 80,
                    "n_fft": 800, "hop": 200, "fmin": 55, "fmax": 7600, "preemphasis": 0.97},
            "box_pads": {"top": BOX_PADS[0], "bottom": BOX_PADS[1], "left": BOX_PADS[2], "right": BOX_PADS[3]},
            "box_smooth_frames": BOX_SMOOTH,
            "opset": opset,
            "parameters": n_params,
            "checked_max_abs_diff_vs_torch": diff32,
            "checked_max_abs_diff_vs_fp32": diff if precision != "fp32" else 0.0,
            "checked_mean_abs_diff_vs_fp32": mean if precision != "fp32" else 0.0,
            "source": checkpoint.name,
            "source_sha256": _sha256(checkpoint),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        side = sidecar_path(output)
        tmp_side = work / "side.json"
        tmp_side.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(result, output)
        os.replace(tmp_side, side)
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) and {side.name} in {time.monotonic() - t0:.1f} s")
    return meta


def cli_export(args) -> int:
    """`heygem-watch export-model`: args has .checkpoint, .output, .opset, .fp16, .int8. Returns the exit code."""
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"export-model needs the 'export' extra (torch + onnx): pip install -e '.[export]' ({exc})",
              file=sys.stderr)
        return 2
    if getattr(args, "fp16", False) and getattr(args, "int8", False):
        print("choose one of --fp16 and --int8", file=sys.stderr)
        return 2
    precision = "fp16" if getattr(args, "fp16", False) else "int8" if getattr(args, "int8", False) else "fp32"
    opset = getattr(args, "opset", None) or DEFAULT_OPSET
    try:
        export_checkpoint(args.checkpoint, args.output, opset=int(opset), precision=precision)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - exporter/runtime failures: one line, not a traceback
        print(f"export failed: {args.checkpoint} -> {args.output} at opset {opset}: {type(exc).__name__}: "
              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} (try another --opset; please report "
              "it with your torch, onnx and onnxruntime versions)", file=sys.stderr)
        return 1
    return 0
