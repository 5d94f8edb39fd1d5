"""export-model: a random-weight checkpoint of the exact public layout (DataParallel prefix, non-trivial batch-norm
statistics) is rebuilt, exported and checked against torch; wrong files fail with messages that name the problem."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from heygem_watch.engines.onnx import checkpoint as C
from heygem_watch.engines.onnx import export as E
from heygem_watch.engines.onnx import precision as P


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = C.build_wav2lip()
    C.randomise_batchnorm(m, seed=1)
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "wav2lip_gan.pth"
    state = {"module." + k: v for k, v in model.state_dict().items()}  # saved from DataParallel
    torch.save({"state_dict": state, "optimizer": {}, "global_step": 1234, "global_epoch": 7}, path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "w2l.onnx"
    lines: list[str] = []
    meta = E.export_checkpoint(checkpoint, out, log=lines.append)
    return out, meta, lines


def test_layout_matches_the_published_names(model):
    keys = model.state_dict().keys()
    for k in ["face_encoder_blocks.0.0.conv_block.0.weight", "face_encoder_blocks.6.1.conv_block.1.running_var",
              "audio_encoder.12.conv_block.1.num_batches_tracked", "face_decoder_blocks.1.0.conv_block.0.weight",
              "face_decoder_blocks.6.2.conv_block.1.bias", "output_block.0.conv_block.0.weight",
              "output_block.1.weight", "output_block.1.bias"]:
        assert k in keys
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - 36.3) < 0.05
    assert tuple(model.state_dict()["face_decoder_blocks.3.0.conv_block.0.weight"].shape) == (768, 384, 3, 3)
    with torch.no_grad():
        y = model(torch.zeros(2, 1, 80, 16), torch.zeros(2, 6, 96, 96))
    assert y.shape == (2, 3, 96, 96)


def test_conv_only_graph_is_the_same_function(model):
    feeds = E.random_inputs(2, seed=5)
    a = E.torch_forward(model, feeds)
    b = E.torch_forward(E.conv_only(model), feeds)
    assert np.abs(a - b).max() < 1e-5
    assert a.std() > 1e-3  # the output depends on the input at all


def test_export_matches_torch_at_several_batch_sizes(model, exported):
    out, meta, lines = exported
    assert meta["checked_max_abs_diff_vs_torch"] < 1e-4
    assert any("max abs diff" in ln for ln in lines)
    for b in (1, 5):
        feeds = E.random_inputs(b, seed=10 + b)
        diff = np.abs(E.run_onnx(out, feeds) - E.torch_forward(model, feeds)).max()
        assert diff < 1e-4
    side = json.loads(E.sidecar_path(out).read_text())
    assert side["face_size"] == 96 and side["color_order"] == "BGR" and side["mel"]["window"] == 16
    assert side["box_pads"] == {"top": 0, "bottom": 10, "left": 0, "right": 0} and side["precision"] == "fp32"
    assert len(side["source_sha256"]) == 64


def test_engine_loads_the_export(exported):
    from heygem_watch.engines.onnx.engine import OnnxEngine

    out, _, _ = exported
    eng = OnnxEngine(out, batch_size=2)
    d = eng.describe()
    assert d["precision"] == "fp32" and d["provider"] == "CPUExecutionProvider"
    feeds = E.random_inputs(3, seed=3)
    pred = eng.infer(feeds["audio"], feeds["face"])
    assert pred.shape == (3, 96, 96, 3)
    assert np.abs(pred - E.run_onnx(out, feeds).transpose(0, 2, 3, 1)).max() < 1e-5


def _save(path: Path, state: dict) -> Path:
    torch.save({"state_dict": state}, path)
    return path


def test_missing_unexpected_and_misshaped_keys_are_named(model, tmp_path):
    sd = dict(model.state_dict())
    missing = dict(sd)
    del missing["audio_encoder.3.conv_block.1.running_mean"]
    with pytest.raises(C.ExportError, match=r"1 missing key\(s\): audio_encoder\.3\.conv_block\.1\.running_mean"):
        C.load_checkpoint(_save(tmp_path / "a.pth", missing))
    extra = dict(sd, **{"module.extra_head.weight": torch.zeros(3)})
    with pytest.raises(C.ExportError, match=r"unexpected key\(s\): extra_head\.weight"):
        C.load_checkpoint(_save(tmp_path / "b.pth", extra))
    bad = dict(sd, **{"output_block.1.weight": torch.zeros(3, 16, 1, 1)})
    with pytest.raises(C.ExportError, match=r"output_block\.1\.weight \(3, 16, 1, 1\) \(expected \(3, 32, 1, 1\)\)"):
        C.load_checkpoint(_save(tmp_path / "c.pth", bad))
    syncnet = {"face_encoder.0.conv_block.0.weight": torch.zeros(32, 15, 7, 7)}
    with pytest.raises(C.ExportError, match="does not look like a Wav2Lip generator"):
        C.load_checkpoint(_save(tmp_path / "d.pth", syncnet))


def test_wrong_files_fail_clearly(checkpoint, tmp_path):
    txt = tmp_path / "readme.pth"
    txt.write_text("hello")
    with pytest.raises(C.ExportError, match="readme.pth: not a readable PyTorch checkpoint"):
        C.load_checkpoint(txt)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 3])
    with pytest.raises(C.ExportError, match="cut.pth: not a readable PyTorch checkpoint"):
        C.load_checkpoint(cut)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(C.ExportError, match="empty"):
        C.load_checkpoint(empty)
    with pytest.raises(C.ExportError, match="not found"):
        C.load_checkpoint(tmp_path / "nope.pth")
    from argparse import Namespace as Obj

    torch.save({"state_dict": {}, "hparams": Obj(lr=1e-4)}, tmp_path / "pickled.pth")
    with pytest.raises(C.ExportError, match="pickled.pth: the checkpoint holds Python objects"):
        C.load_checkpoint(tmp_path / "pickled.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(C.ExportError, match="expected a dict"):
        C.load_checkpoint(tmp_path / "list.pth")


def test_cli_exit_codes(tmp_path, capsys):
    bad = tmp_path / "x.pth"
    bad.write_text("nope")
    args = Namespace(checkpoint=str(bad), output=str(tmp_path / "m.onnx"), opset=None, fp16=False, int8=False)
    assert E.cli_export(args) == 1
    assert "export failed" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    args.fp16 = args.int8 = True
    assert E.cli_export(args) == 2


class Small(torch.nn.Module):
    """The Wav2Lip input/output signature with a few layers: quantization and fp16 paths without the 20 s cost."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 8, 3, 1, 1)
        self.f = torch.nn.Conv2d(6, 16, 3, 2, 1)
        self.o = torch.nn.Conv2d(8, 12, 3, 1, 1)

    def forward(self, audio, face):
        x = torch.relu(self.f(face)) + self.a(audio).mean((2, 3), keepdim=True).repeat(1, 2, 1, 1)
        x = torch.nn.functional.pixel_shuffle(self.o(torch.relu(x[:, :8])), 2)
        return torch.sigmoid(x)


def test_fp16_and_int8_variants_stay_close(tmp_path):
    torch.manual_seed(2)
    small = Small().eval()
    fp32 = tmp_path / "s.onnx"
    E.export_onnx(small, fp32)
    feeds = E.random_inputs(4, seed=1)
    ref = E.torch_forward(small, feeds)
    assert np.abs(E.run_onnx(fp32, feeds) - ref).max() < 1e-5
    P.to_fp16(fp32, tmp_path / "h.onnx")
    h = E.run_onnx(tmp_path / "h.onnx", feeds)
    assert h.dtype == np.float32 and 0 < np.abs(h - ref).max() < 5e-3  # really fp16 inside, and close
    P.to_int8(fp32, tmp_path / "q.onnx", tmp_path)
    real = P.calibration_inputs(4, seed=77)  # face crops + voiced mel, the distribution it was calibrated for
    q, ref_real = E.run_onnx(tmp_path / "q.onnx", real), E.torch_forward(small, real)
    assert 0 < np.abs(q - ref_real).max() < 0.05 and np.abs(q - ref_real).mean() < 0.01
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_precision_and_export_do_not_import_each_other():
    """precision.py takes the Wav2Lip conventions from wav2lip.py; importing it must not pull in export.py."""
    import subprocess
    import sys

    code = ("import sys; import heygem_watch.engines.onnx.precision; "
            "print('heygem_watch.engines.onnx.export' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
