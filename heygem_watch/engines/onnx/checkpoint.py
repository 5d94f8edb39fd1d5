"""Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth) -> the torch network export.py exports (needs torch).

The network is rebuilt from the published layer table (docs/onnx.md) with the published parameter names, and the
checkpoint's state dict is loaded strictly: a file that is missing, empty, not a PyTorch checkpoint, holds Python
objects besides tensors, or whose keys or shapes differ from the layout is refused with every problem named.
torch is imported inside the functions: the rest of the package never needs it.
"""
from __future__ import annotations

import os
from pathlib import Path

DP_PREFIX = "module."  # DataParallel checkpoints prefix every key with this

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
