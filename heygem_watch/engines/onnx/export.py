"""Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth) -> ONNX, verified against torch (needs the `export` extra).

    heygem-watch export-model CHECKPOINT.pth models/NAME.onnx [--opset N] [--fp16] [--int8]

The network is rebuilt from the published layer table (docs/onnx.md), the state dict is loaded strictly (every
missing, unexpected or mis-shaped key is named), exported with a dynamic batch axis, and run once through
onnxruntime against torch on random input. NAME.json beside the model records the input conventions the engine
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

from heygem_watch.engines.onnx.wav2lip import BOX_PADS, BOX_SMOOTH, FACE_SIZE, MEL_BANDS, MEL_STEP

DEFAULT_OPSET = 17
INPUT_NAMES = ("audio", "face")
OUTPUT_NAME = "out"
DP_PREFIX = "module."  # DataParallel checkpoints prefix every key with this
FP32_TOL = 1e-4  # max |onnx - torch| accepted for the fp32 export
FP16_TOL = 2e-2  # fp16 / int8 are reported against the fp32 graph with looser bounds (output range 0..1)
INT8_TOL = 0.25
INT8_MEAN_TOL = 0.02
CHECK_BATCH = 3  # random samples in the numerical check (not 1: exercises the dynamic batch axis)

# (kind, cin, cout, kernel, stride, padding, residual-or-output_padding) per unit; kind "c" conv, "t" transposed.
FACE_ENCODER = [
    [("c", 6, 16, 7, 1, 3, False)],
    [("c", 16, 32, 3, 2, 1, False)] + [("c", 32, 32, 3, 1, 1, True)] * 2,
    [("c", 32, 64, 3, 2, 1, False)] + [("c", 64, 64, 3, 1, 1, True)] * 3,
    [("c", 64, 128, 3, 2, 1, False)] + [("c", 128, 128, 3, 1, 1, True)] * 2,
    [("c", 128, 256, 3, 2, 1, False)] + [("c", 256, 256, 3, 1, 1, True)] * 2,
    [("c", 256, 512, 3, 2, 1, False), ("c", 512, 512, 3, 1, 1, True)],
    [("c", 512, 512, 3, 1, 0, False), ("c", 512, 512, 1, 1, 0, False)],
]
AUDIO_ENCODER = ([("c", 1, 32, 3, 1, 1, False)] + [("c", 32, 32, 3, 1, 1, True)] * 2
                 + [("c", 32, 64, 3, (3, 1), 1, False)] + [("c", 64, 64, 3, 1, 1, True)] * 2
                 + [("c", 64, 128, 3, 3, 1, False)] + [("c", 128, 128, 3, 1, 1, True)] * 2
                 + [("c", 128, 256, 3, (3, 2), 1, False), ("c", 256, 256, 3, 1, 1, True)]
                 + [("c", 256, 512, 3, 1, 0, False), ("c", 512, 512, 1, 1, 0, False)])
FACE_DECODER = [
    [("c", 512, 512, 1, 1, 0, False)],
    [("t", 1024, 512, 3, 1, 0, 0), ("c", 512, 512, 3, 1, 1, True)],
    [("t", 1024, 512, 3, 2, 1, 1)] + [("c", 512, 512, 3, 1, 1, True)] * 2,
    [("t", 768, 384, 3, 2, 1, 1)] + [("c", 384, 384, 3, 1, 1, True)] * 2,
    [("t", 512, 256, 3, 2, 1, 1)] + [("c", 256, 256, 3, 1, 1, True)] * 2,
    [("t", 320, 128, 3, 2, 1, 1)] + [("c", 128, 128, 3, 1, 1, True)] * 2,
    [("t", 160, 64, 3, 2, 1, 1)] + [("c", 64, 64, 3, 1, 1, True)] * 2,
]


class ExportError(Exception):
    """The checkpoint cannot be exported (message names the file and the reason)."""


def sidecar_path(model_path: os.PathLike | str) -> Path:
    """models/NAME.onnx -> models/NAME.json."""
    return Path(model_path).with_suffix(".json")


def build_wav2lip():
    """The Wav2Lip generator as a torch.nn.Module (eval mode, random weights), parameter names as published."""
    import torch
    from torch import nn

    class Unit(nn.Module):
        def __init__(self, kind, cin, cout, k, stride, pad, extra):
            super().__init__()
            if kind == "t":
                conv = nn.ConvTranspose2d(cin, cout, k, stride, pad, output_padding=extra)
                self.residual = False
            else:
                conv = nn.Conv2d(cin, cout, k, stride, pad)
                self.residual = bool(extra)
            self.conv_block = nn.Sequential(conv, nn.BatchNorm2d(cout))
            self.act = nn.ReLU()

        def forward(self, x):
            out = self.conv_block(x)
            return self.act(out + x if self.residual else out)

    def seq(units):
        return nn.Sequential(*[Unit(*u) for u in units])

    class Wav2Lip(nn.Module):
        def __init__(self):
            super().__init__()
            self.face_encoder_blocks = nn.ModuleList([seq(b) for b in FACE_ENCODER])
            self.audio_encoder = seq(AUDIO_ENCODER)
            self.face_decoder_blocks = nn.ModuleList([seq(b) for b in FACE_DECODER])
            self.output_block = nn.Sequential(Unit("c", 80, 32, 3, 1, 1, False), nn.Conv2d(32, 3, 1, 1, 0),
                                              nn.Sigmoid())

        def forward(self, audio, face):
            x = self.audio_encoder(audio)  # (B, 512, 1, 1)
            feats = []
            f = face
            for block in self.face_encoder_blocks:
                f = block(f)
                feats.append(f)
            for i, block in enumerate(self.face_decoder_blocks):
                x = torch.cat([block(x), feats[len(feats) - 1 - i]], dim=1)
            return self.output_block(x)

    return Wav2Lip().eval()


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


def randomise_batchnorm(model, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine terms (tests: identity BN hides bugs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.num_batches_tracked.fill_(1000)


def load_checkpoint(path: os.PathLike | str):
    """Rebuild the network and load a public-layout checkpoint strictly. Raises ExportError naming the problem."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise ExportError(f"{path}: file is empty (0 bytes)")
    try:
        # weights_only: a checkpoint is data; never run code from a downloaded pickle
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only load failed" in msg.lower():
            raise ExportError(f"{path}: the checkpoint holds Python objects besides tensors, and code from a "
                              "checkpoint is never run; if you trust the file, re-save only its weights: "
                              "torch.save({'state_dict': torch.load(p, weights_only=False)['state_dict']}, "
                              "'clean.pth')") from None
        raise ExportError(f"{path}: not a readable PyTorch checkpoint (truncated or another format?): {msg}") from None
    state = _state_dict_of(ckpt, path)
    model = build_wav2lip()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = ""
        if len(missing) > len(expected) // 2:
            hint = (" - this does not look like a Wav2Lip generator checkpoint (SyncNet/discriminator, "
                    "Wav2Lip-HQ or another architecture?)")
        raise ExportError(f"{path}: state dict does not match the Wav2Lip layout: "
                          f"{len(missing)} missing key(s){_few(missing)}, "
                          f"{len(unexpected)} unexpected key(s){_few(unexpected)}{hint}")
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ExportError(f"{path}: {len(bad)} tensor(s) have the wrong shape{_few(bad)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _few(items: list[str], n: int = 5) -> str:
    if not items:
        return ""
    more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
    return ": " + ", ".join(items[:n]) + more


def _state_dict_of(ckpt, path: Path) -> dict:
    import torch

    if not isinstance(ckpt, dict):
        raise ExportError(f"{path}: expected a dict with a 'state_dict' entry, found {type(ckpt).__name__}")
    state = ckpt.get("state_dict", ckpt)  # also accept a bare state dict
    if not isinstance(state, dict) or not state:
        raise ExportError(f"{path}: 'state_dict' is empty or not a mapping")
    non_tensor = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise ExportError(f"{path}: no weights found under 'state_dict' (non-tensor entries{_few(non_tensor)})")
    return {(k[len(DP_PREFIX):] if k.startswith(DP_PREFIX) else k): v for k, v in state.items()}


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
