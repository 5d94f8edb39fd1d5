"""The SCRFD decoder with tiny hand-built ONNX models of the insightface SCRFD output layout (no weights, no
downloads): the graphs ignore the image and return constant score/box/key-point tensors that encode known faces."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from heygem_watch.engines.onnx.scrfd import (NMS_IOU, PIXEL_MEAN, PIXEL_STD, STRIDES, Scrfd, ScrfdError, anchor_centres,
                                letterbox, main_face, nms)


def place(box, stride: int, size=(640, 640), anchors: int = 2, anchor: int = 0):
    """Encode an input-pixel box as (row, distances (4,), key points (10,)) at the grid point nearest its centre."""
    x1, y1, x2, y2 = box
    gx, gy = round((x1 + x2) / 2 / stride), round((y1 + y2) / 2 / stride)
    cx, cy = gx * stride, gy * stride
    d = np.array([cx - x1, cy - y1, x2 - cx, y2 - cy], np.float32) / stride
    pts = np.array([[x1 + (x2 - x1) * f, y1 + (y2 - y1) * g] for f, g in
                    ((.3, .4), (.7, .4), (.5, .6), (.35, .8), (.65, .8))], np.float32)
    kps = ((pts - (cx, cy)) / stride).reshape(-1)
    return ((gy * (size[0] // stride) + gx) * anchors + anchor), d, kps


def scrfd_model(path: Path, faces=(), size=(640, 640), dynamic: bool = False, kps: bool = True,
                batch: bool = True, anchors: int = 2, rows_for=None, n_inputs: int = 1, channels: int = 3,
                out_widths=None) -> Path:
    """A constant-output model. faces: [(input-pixel box, score, stride[, anchor])]. The other arguments build
    layouts the loader must accept (dynamic sizes, no key points, no batch axis) or refuse (the rest)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = [(size[0] // s) * (size[1] // s) * anchors for s in STRIDES]
    if rows_for:
        rows = rows_for
    widths = out_widths or [1, 4] + ([10] if kps else [])
    data = {(g, k): np.zeros((rows[k], w), np.float32) for g, w in enumerate(widths) for k in range(3)}
    for k in range(3):
        data[0, k][:] = 0.02
    for face in faces:
        box, score, stride = face[:3]
        k = STRIDES.index(stride)
        row, d, kp = place(box, stride, size, anchors, face[3] if len(face) > 3 else 0)
        data[0, k][row, 0], data[1, k][row] = score, d
        if kps:
            data[2, k][row] = kp
    dims = ["b", channels, "h", "w"] if dynamic else [1, channels, size[1], size[0]]
    ins = [helper.make_tensor_value_info(f"input.{i}", TensorProto.FLOAT, dims) for i in range(n_inputs)]
    outs, nodes, inits = [], [], []
    for (g, k), arr in data.items():
        name = f"out_{g}_{k}"
        arr = arr[None] if batch else arr
        inits.append(numpy_helper.from_array(arr, f"c_{g}_{k}"))
        nodes.append(helper.make_node("Identity", [f"c_{g}_{k}"], [name]))
        shape = list(arr.shape)
        if dynamic:
            shape[-2] = f"n{k}"
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    g = helper.make_graph(nodes, "scrfd_layout", ins, outs, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_letterbox_is_top_left_rgb_and_normalised():
    img = np.zeros((360, 1280, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 120, 250  # B, G, R
    blob, (sx, sy) = letterbox(img, (640, 640))
    assert blob.shape == (1, 3, 640, 640) and blob.dtype == np.float32
    assert sx == sy == 0.5
    assert np.allclose(blob[0, :, 0, 0], (np.array([250, 120, 10]) - PIXEL_MEAN) / PIXEL_STD)  # R, G, B
    assert np.allclose(blob[0, :, 180:, :], -PIXEL_MEAN / PIXEL_STD)  # padding below: black
    tall, (sx, sy) = letterbox(np.full((800, 400, 3), 200, np.uint8), (640, 640))
    assert (sx, sy) == (0.8, 0.8) and np.allclose(tall[0, :, :, 320:], -PIXEL_MEAN / PIXEL_STD)  # padding right
    assert np.allclose(tall[0, :, :, :320], (200 - PIXEL_MEAN) / PIXEL_STD)


def test_anchor_centres_order():
    c = anchor_centres((64, 32), 16, 2)  # 4 x 2 grid, two anchors per location
    assert c.shape == (16, 2)
    assert c[:4].tolist() == [[0, 0], [0, 0], [16, 0], [16, 0]]  # x runs first, anchors interleaved
    assert c[8].tolist() == [0, 16]


@pytest.mark.parametrize("variant", [
    dict(),  # 9 outputs with a batch axis, fixed 640x640
    dict(kps=False, batch=False),  # 6 outputs, no batch axis
    dict(dynamic=True),  # symbolic input and row counts: 640x640 assumed, rows checked on the first run
    dict(size=(320, 256), anchors=1),  # another fixed input size, one anchor per location
])
def test_decoder_recovers_boxes_through_the_letterbox(tmp_path, variant):
    size = variant.get("size", (640, 640))
    img = np.zeros((720, 1280, 3), np.uint8)  # 16:9: fits the width, padding at the bottom
    scale = size[0] / 1280
    want = np.array([[200, 160, 520, 560], [900, 100, 1060, 300]], np.float32)  # original-image pixels
    faces = [(want[0] * scale, 0.93, 16), (want[1] * scale, 0.8, 8)]
    det = Scrfd(scrfd_model(tmp_path / "scrfd_t.onnx", faces, **variant))
    assert det.size == size and det.has_kps == variant.get("kps", True)
    boxes, scores, kps = det.detect(img)
    assert np.allclose(boxes, want, atol=1e-3) and np.allclose(scores, [0.93, 0.8])
    if det.has_kps:
        assert kps.shape == (2, 5, 2)
        assert np.allclose(kps[0, 0], [200 + 0.3 * 320, 160 + 0.4 * 400], atol=1e-3)
    else:
        assert kps is None
    assert np.allclose(det.face_box(img), want[0])  # the largest face
    tall = np.zeros((1000, 500, 3), np.uint8)  # fits the height, padding at the right
    want_t = np.array([100, 200, 400, 700], np.float32)
    s2 = size[1] / 1000
    det2 = Scrfd(scrfd_model(tmp_path / "scrfd_u.onnx", [(want_t * s2, 0.9, 32)], **variant))
    assert np.allclose(det2.detect(tall)[0], [want_t], atol=1e-3)


def test_nms_removes_duplicates_and_keeps_distinct_faces(tmp_path):
    base = np.array([100, 100, 300, 340], np.float32)
    faces = [(base, 0.9, 8), (base + [4, 4, 4, 4], 0.85, 8, 1), (base + [8, 0, 8, 0], 0.7, 16),
             (np.array([420, 80, 500, 180], np.float32), 0.6, 8)]
    det = Scrfd(scrfd_model(tmp_path / "det_nms.onnx", faces))
    boxes, scores, _ = det.detect(np.zeros((640, 640, 3), np.uint8))
    assert len(boxes) == 2 and np.allclose(boxes[0], base) and np.allclose(scores, [0.9, 0.6])
    b = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]], np.float32)
    assert nms(b, np.array([0.5, 0.9, 0.6], np.float32), NMS_IOU).tolist() == [1]
    assert nms(b, np.array([0.5, 0.9, 0.6], np.float32), 0.99).tolist() == [1, 2]  # only the identical one goes


def test_no_face_below_the_threshold(tmp_path):
    det = Scrfd(scrfd_model(tmp_path / "scrfd_low.onnx", [(np.array([10, 10, 90, 90]), 0.3, 8)]))
    img = np.zeros((480, 640, 3), np.uint8)
    boxes, scores, kps = det.detect(img)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and kps.shape == (0, 5, 2)
    assert det.face_box(img) is None
    assert len(det.detect(img, threshold=0.25)[0]) == 1


def test_main_face_prefers_large_then_central():
    b = np.array([[0, 0, 100, 100], [270, 190, 370, 290], [10, 10, 60, 60]], np.float32)
    assert main_face(b, 640, 480) == 1  # same size: the central one
    b[0] = [0, 0, 200, 200]
    assert main_face(b, 640, 480) == 0  # clearly larger wins even off-centre


@pytest.mark.parametrize("bad, why", [
    (dict(n_inputs=2), "inputs"),
    (dict(channels=1), "input shape"),
    (dict(size=(630, 640)), "multiple of 32"),
    (dict(out_widths=[4, 1]), "output 0"),  # boxes before scores
    (dict(out_widths=[1, 4, 4, 10]), "12 outputs"),
    (dict(rows_for=[6400, 1600, 401]), "stride 32"),  # not a whole number of anchors per location
    (dict(rows_for=[800, 3200, 12800]), "stride 8"),  # strides reversed
    (dict(rows_for=[800, 3200, 12800], dynamic=True), "stride 8"),  # symbolic in the file: caught by the probe run
])
def test_wrong_layouts_are_refused_by_name(tmp_path, bad, why):
    path = scrfd_model(tmp_path / "scrfd_bad.onnx", **bad)
    with pytest.raises(ScrfdError, match="scrfd_bad.onnx") as err:
        Scrfd(path)
    assert why in str(err.value) and "SCRFD" in str(err.value)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "det_junk.onnx"
    junk.write_text("not a model")
    with pytest.raises(ScrfdError, match="det_junk.onnx: onnxruntime cannot load"):
        Scrfd(junk)
    with pytest.raises(ScrfdError, match="not found"):
        Scrfd(tmp_path / "scrfd_missing.onnx")
