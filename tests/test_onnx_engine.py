"""The ONNX engine with tiny hand-built ONNX models of the Wav2Lip input/output signature (no torch, fast):
"identity" returns the reference crop, "pattern" a checkerboard; a recording session proxy checks what is fed."""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from heygem_watch.engines.onnx import engine as engine_mod, mel
from heygem_watch.audio import AudioTrack
from heygem_watch.engines.base import EngineError, FrameJob
from heygem_watch.engines.onnx.crop import crop_input, face_boxes, paste_mask
from heygem_watch.engines.onnx.engine import OnnxEngine
from heygem_watch.engines.onnx.wav2lip import BOX_PADS, FACE_SIZE
from heygem_watch.pipeline import pingpong_index

FACELESS = frozenset({4, 5})
JOIN_TIMEOUT_S = 60  # generous: only a broken engine waits this long


def tiny_model(path: Path, kind: str, inputs=("audio", "face")) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    a = helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, ["batch", 1, 80, 16])
    f = helper.make_tensor_value_info(inputs[1], TensorProto.FLOAT, ["batch", 6, 96, 96])
    o = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 96, 96])
    inits = [numpy_helper.from_array(np.array([3], np.int64), "s"),
             numpy_helper.from_array(np.array([6], np.int64), "e"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    nodes = [helper.make_node("Slice", [inputs[1], "s", "e", "ax"], ["ref"])]
    if kind == "identity":
        nodes.append(helper.make_node("Identity", ["ref"], ["out"]))
    else:
        yy, xx = np.mgrid[:96, :96]
        pat = (((yy // 8 + xx // 8) % 2) * 0.9).astype(np.float32)[None, None].repeat(3, 1)
        inits += [numpy_helper.from_array(pat, "pat"), numpy_helper.from_array(np.zeros(1, np.float32), "z")]
        nodes += [helper.make_node("Mul", ["ref", "z"], ["r0"]), helper.make_node("Add", ["r0", "pat"], ["out"])]
    g = helper.make_graph(nodes, "tiny", [a, f], [o], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def tpl(tmp_path_factory):
    """A real Template (MediaPipe track) of the test face, 12 frames, two without a face."""
    from heygem_watch.template import load_template
    from tests import gen_media

    root = tmp_path_factory.mktemp("onnx_tpl")
    video = gen_media.face_video(root / "face.mp4", n=12, faceless=FACELESS, size=(256, 288))
    t = load_template(video, root / "cache")
    assert t.face_found.sum() == 10 and not t.face_found[list(FACELESS)].any()
    return t


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {k: tiny_model(d / f"{k}.onnx", k) for k in ("identity", "pattern")}


@pytest.fixture(scope="module")
def track(tmp_path_factory):
    rng = np.random.default_rng(3)
    t = np.arange(int(16000 * 1.3)) / 16000
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t)))
    return AudioTrack.from_array(x.astype(np.float32), tmp_path_factory.mktemp("audio"))


def jobs_for(tpl, n: int):
    fps = tpl.fps
    for i in range(n):
        k = pingpong_index(i, tpl.n_frames)
        yield FrameJob(i, float(i / fps), k, tpl.frame(k))


class Recorder:
    """Wraps a session: records the audio windows fed; optionally fails like a GPU out of memory above a batch."""

    def __init__(self, sess, oom_above: int | None = None, error: str | None = None):
        self.sess, self.oom_above, self.error = sess, oom_above, error
        self.audio: list[np.ndarray] = []
        self.batches: list[int] = []

    def run(self, names, feeds):
        b = len(feeds["audio"])
        if self.error:
            raise RuntimeError(self.error)
        if self.oom_above is not None and b > self.oom_above:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory")
        self.audio.extend(feeds["audio"])
        self.batches.append(b)
        return self.sess.run(names, feeds)

    def __getattr__(self, k):
        return getattr(self.sess, k)


def test_face_boxes_pad_smooth_and_runs():
    rng = np.random.default_rng(0)
    n = 9
    base = rng.uniform(100, 200, (478, 2)).astype(np.float32)
    lms = np.repeat(base[None], n, 0)
    lms[3] = np.nan  # a face-less frame splits the track into two runs
    found = np.ones(n, bool)
    found[3] = False
    boxes, valid = face_boxes(lms, found, 400, 300)
    assert not valid[3] and valid[[0, 1, 2, 4, 8]].all()
    b0 = boxes[0]
    assert (boxes[valid] == b0).all()  # a still face: smoothing changes nothing
    jit = lms.copy()
    jit[4:, :, 1] += np.array([0, 8, 0, 8, 0])[:, None]  # vertical jitter of 8 px in the second run
    boxes_j, _ = face_boxes(jit, found, 400, 300)
    assert np.ptp(boxes_j[4:, 1]) < 8  # the 5-frame mean reduces it
    assert (boxes_j[:3] == b0).all()  # the first run is not blended with the second
    unpadded, _ = face_boxes(lms, found, 400, 300, pads=(0, 0, 0, 0), smooth=1)
    assert (b0 - unpadded[0]).tolist() == [-BOX_PADS[2], -BOX_PADS[0], BOX_PADS[3], BOX_PADS[1]]


def test_crop_input_bgr_and_masked_lower_half():
    img = np.zeros((200, 300, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 120, 250  # B, G, R
    x = crop_input(img, (50, 20, 250, 180))
    assert x.shape == (6, FACE_SIZE, FACE_SIZE) and x.dtype == np.float32
    assert np.allclose(x[3:, 0, 0], np.array([10, 120, 250]) / 255)  # reference: BGR order, /255
    assert np.allclose(x[:3, :48], x[3:, :48]) and (x[:3, 48:] == 0).all()


def test_paste_mask_is_feathered_on_the_mouth(tpl):
    state_boxes, valid = face_boxes(tpl.landmarks, tpl.face_found, tpl.width, tpl.height)
    k = int(np.flatnonzero(valid)[0])
    x1, y1, x2, y2 = state_boxes[k]
    m = paste_mask(tpl.landmarks[k], state_boxes[k])
    assert m.shape == (y2 - y1, x2 - x1)
    border = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
    assert border.max() < 0.02  # no step at the box edge
    lm = tpl.landmarks[k] - (x1, y1)
    mouth = np.round(lm[[13, 14]].mean(0)).astype(int)
    assert m[mouth[1], mouth[0]] > 0.95  # the mouth is replaced
    eye = np.round(lm[33]).astype(int)
    assert m[eye[1], eye[0]] < 0.01  # the eyes are not
    assert 0.05 < ((m > 0.02) & (m < 0.98)).mean()  # a soft ramp, not a hard cut


def test_render_pastes_only_on_faces_and_keeps_order(tpl, models, track):
    eng = OnnxEngine(models["pattern"], batch_size=3)
    assert eng.provider == "CPUExecutionProvider" and "onnxruntime-gpu" in eng.provider_reason
    state = eng.prepare_template(tpl)
    speech = eng.analyse_speech(track)
    n = 26
    out = list(eng.render(tpl, state, speech, jobs_for(tpl, n)))
    assert len(out) == n
    for i, frame in enumerate(out):
        k = pingpong_index(i, tpl.n_frames)
        orig = tpl.frame(k)
        diff = np.abs(frame.astype(int) - orig).max(2)
        if k in FACELESS:
            assert (frame == orig).all()  # no face: unchanged
            continue
        x1, y1, x2, y2 = state.boxes[k]
        inside = np.zeros_like(diff, bool)
        inside[y1:y2, x1:x2] = True
        assert diff[~inside].max() == 0  # nothing outside the face box changes
        lm = tpl.landmarks[k]
        mx, my = np.round(lm[[13, 14]].mean(0)).astype(int)
        assert diff[my - 3:my + 4, mx - 3:mx + 4].mean() > 20  # the checkerboard is on the mouth


def test_yuv_jobs_convert_only_the_face_box_and_paste_what_the_bgr_path_pastes(tpl, models, track):
    """Jobs as the pipeline makes them (yuv420p): only each face box goes to BGR and back. Inside the box the
    result is the BGR path's (after the writer's conversion) to the rounding; outside it, and on face-less frames,
    every byte is the template's own."""
    import cv2

    from heygem_watch import template_frames

    eng = OnnxEngine(models["pattern"], batch_size=3)
    state = eng.prepare_template(tpl)
    speech = eng.analyse_speech(track)
    n = 20
    bgr_out = list(eng.render(tpl, state, speech, jobs_for(tpl, n)))
    yjobs = [FrameJob(i, float(i / tpl.fps), pingpong_index(i, tpl.n_frames),
                      yuv=tpl.yuv(pingpong_index(i, tpl.n_frames))) for i in range(n)]
    yuv_out = list(eng.render(tpl, state, speech, iter(yjobs)))
    h, w = tpl.height, tpl.width
    assert len(yuv_out) == n
    for i, (y, b) in enumerate(zip(yuv_out, bgr_out)):
        k = pingpong_index(i, tpl.n_frames)
        orig = tpl.yuv(k)
        assert y.shape == (h * 3 // 2, w)
        if k in FACELESS:
            assert np.array_equal(y, orig)
            continue
        x1, y1, x2, y2 = (int(v) for v in state.boxes[k])
        ex0, ey0, ex1, ey1 = template_frames.even_box((x1, y1, x2 - x1, y2 - y1), w, h)
        inside = np.zeros((h, w), bool)
        inside[ey0:ey1, ex0:ex1] = True
        out_mask = np.concatenate([(~inside).reshape(-1), (~inside[::2, ::2]).reshape(-1),
                                   (~inside[::2, ::2]).reshape(-1)])
        assert np.array_equal(y.reshape(-1)[out_mask], orig.reshape(-1)[out_mask])
        assert not np.array_equal(y, orig)  # the pattern was pasted
        err = np.abs(y.astype(int) - cv2.cvtColor(b, cv2.COLOR_BGR2YUV_I420).astype(int)).reshape(-1)[~out_mask]
        assert err.max() <= 1, (k, err.max())


def test_identity_model_leaves_the_face_nearly_intact(tpl, models, track):
    eng = OnnxEngine(models["identity"])
    state = eng.prepare_template(tpl)
    out = list(eng.render(tpl, state, eng.analyse_speech(track), jobs_for(tpl, 3)))
    for i, frame in enumerate(out):
        x1, y1, x2, y2 = state.boxes[i]
        d = np.abs(frame.astype(float) - tpl.frame(i))[y1:y2, x1:x2]
        assert d.mean() < 4 and d.max() > 0  # pasted (96 px round trip blurs a little), no colour shift


def test_mel_windows_follow_the_output_frame_index(tpl, models, track):
    eng = OnnxEngine(models["identity"], batch_size=4, speech_detector=False)  # the plain mel (the tone is no voice)
    rec = Recorder(eng.session)
    eng.session = rec
    state = eng.prepare_template(tpl)
    n = 30
    list(eng.render(tpl, state, eng.analyse_speech(track), jobs_for(tpl, n)))
    spec = mel.MelSpectrogram(track)
    want = [spec.window(i, tpl.fps) for i in range(n) if state.valid[pingpong_index(i, tpl.n_frames)]]
    assert len(rec.audio) == len(want)
    # CPU workers run batches side by side, so the session may see them in any order: compare as multisets
    assert sorted(g[0].tobytes() for g in rec.audio) == sorted(np.asarray(w, np.float32).tobytes() for w in want)
    assert max(rec.batches) <= 4


def test_the_model_hears_silence_where_the_detector_hears_no_speech(tpl, models, tmp_path):
    """Music, then speech (espeak-ng), then music: every window fed in the music is digital silence (the mouth the
    model draws in a pause), the speech's windows are the plain mel; with the detector off, the music is fed too."""
    from tests.mediagen import SR, music, spoken

    sp = spoken("Good evening everyone, thank you for joining the stream tonight.")
    x = np.concatenate([music(2.5, seed=4), sp, music(2.0, seed=5)])
    track = AudioTrack.from_array(x, tmp_path)
    speech_from, speech_to = 2.5, 2.5 + len(sp) / SR
    fps = tpl.fps
    n = int(float(len(x) / SR) * fps)
    plain = mel.MelSpectrogram(track)
    fed = {}
    for on in (True, False):
        eng = OnnxEngine(models["identity"], batch_size=4, speech_detector=on)
        assert eng.describe()["speech_detector"] is on
        eng.session = rec = Recorder(eng.session)
        eng.ready()
        state = eng.prepare_template(tpl)
        list(eng.render(tpl, state, eng.analyse_speech(track), jobs_for(tpl, n)))
        fed[on] = Counter(g[0].tobytes() for g in rec.audio)  # CPU workers may feed batches in any order
    t_mid = (np.array([mel.window_start(i, fps, plain.n_cols) for i in range(n)]) + mel.WINDOW / 2) / 80
    # a window reaching within the detector's padding (vad.PAD_S) of the voice may hold some of it
    fed_frames = [i for i in range(n) if state.valid[pingpong_index(i, tpl.n_frames)]]  # frames with a face
    music_only = [i for i in fed_frames if t_mid[i] < speech_from - 0.45 or t_mid[i] > speech_to + 0.45]
    voiced = [i for i in fed_frames if speech_from + 0.3 < t_mid[i] < speech_to - 0.3]
    silent = np.full((1, mel.N_MELS, mel.WINDOW), mel.SILENT, np.float32).tobytes()
    assert len(music_only) > 40 and len(voiced) > 40
    assert fed[True][silent] >= len(music_only) > fed[False][silent]  # (the spoken clip has silent ends)
    for i in music_only:
        assert plain.window(i, fps)[None].tobytes() in fed[False]
        assert plain.window(i, fps)[None].tobytes() not in fed[True]
    kept = sum(plain.window(i, fps)[None].tobytes() in fed[True] for i in voiced)
    assert kept >= 0.9 * len(voiced)  # the speech is fed as it is


def test_the_speech_mask_silences_its_columns_only(track):
    spec = mel.MelSpectrogram(track)
    mask = np.ones(spec.n_cols, bool)
    mask[10:30] = False
    gated = mel.MelSpectrogram(track, speech=mask)
    assert (gated.columns(0, spec.n_cols)[:, 10:30] == mel.SILENT).all()
    np.testing.assert_array_equal(gated.columns(30, spec.n_cols), spec.columns(30, spec.n_cols))
    np.testing.assert_array_equal(gated.columns(0, 10), spec.columns(0, 10))
    # what digital silence gives
    assert (mel.mel_of_array(np.zeros(4000, np.float32)) == mel.SILENT).all()
    with pytest.raises(ValueError, match="speech mask of shape"):
        mel.MelSpectrogram(track, speech=mask[:-1])


def test_a_missing_speech_detector_is_named_unless_it_is_off(models, no_speech_detector):
    with pytest.raises(EngineError, match="silero-vad"):
        OnnxEngine(models["identity"]).ready()
    OnnxEngine(models["identity"], speech_detector=False).ready()


def test_out_of_memory_halves_the_batch_and_output_is_identical(tpl, models, track):
    ref_eng = OnnxEngine(models["pattern"], batch_size=8)
    state = ref_eng.prepare_template(tpl)
    speech = ref_eng.analyse_speech(track)
    ref = list(ref_eng.render(tpl, state, speech, jobs_for(tpl, 20)))
    eng = OnnxEngine(models["pattern"], batch_size=8)
    rec = Recorder(eng.session, oom_above=2)
    eng.session = rec
    got = list(eng.render(tpl, state, speech, jobs_for(tpl, 20)))
    assert 1 <= eng.batch_size <= 2 and eng.oom_halvings >= 2 and eng.describe()["oom_halvings"] == eng.oom_halvings
    assert max(rec.batches) <= 2
    assert all(np.array_equal(a, b) for a, b in zip(ref, got)) and len(got) == len(ref)
    eng.session = Recorder(rec.sess, oom_above=0)
    with pytest.raises(EngineError, match="out of memory even at batch size 1"):
        list(eng.render(tpl, state, speech, jobs_for(tpl, 5)))
    eng.session = Recorder(rec.sess, error="[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad input")
    with pytest.raises(EngineError, match="inference failed"):
        list(eng.render(tpl, state, speech, jobs_for(tpl, 5)))


def _blocked_in(thread: threading.Thread, name: str) -> bool:
    """True while `thread` is inside the engine's function `name` (e.g. waiting for a slot nobody gives back)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == name and frame.f_code.co_filename == engine_mod.__file__:
            return True
        frame = frame.f_back
    return False


def _wait(pred, timeout: float = JOIN_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _assert_stopped(threads) -> None:
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not [t.name for t in threads if t.is_alive()]


def test_errors_in_jobs_propagate_and_threads_stop(tpl, models, track):
    eng = OnnxEngine(models["identity"], batch_size=2)
    state = eng.prepare_template(tpl)
    speech = eng.analyse_speech(track)

    class Stop(Exception):
        pass

    def failing():
        yield from jobs_for(tpl, 5)
        raise Stop()

    before = set(threading.enumerate())
    with pytest.raises(Stop):
        list(eng.render(tpl, state, speech, failing()))
    _assert_stopped([t for t in threading.enumerate() if t.name.startswith("onnx-") and t not in before])
    pulled = []

    def counting():
        for j in jobs_for(tpl, 10_000):
            pulled.append(j.index)
            yield j

    gen = eng.render(tpl, state, speech, counting())
    next(gen)
    # nobody consumes after the first frame, so no slot is ever given back: prep, having filled one more batch,
    # waits for a slot, a state nothing leaves while nobody consumes (no sleep has to be long enough for it)
    local = gen.gi_frame.f_locals
    threads, batch = local["threads"], local["batch"]
    assert len(threads) == eng.workers + 1
    assert _wait(lambda: _blocked_in(threads[0], "take_slot")), f"read-ahead never blocked; pulled {len(pulled)} jobs"
    # bounded read-ahead, whatever order the workers finish in: 2 * workers + 3 batches (each stage's share) in all
    assert len(pulled) == (2 * eng.workers + 3) * batch
    time.sleep(0.2)
    assert _blocked_in(threads[0], "take_slot") and len(pulled) == (2 * eng.workers + 3) * batch
    gen.close()
    _assert_stopped(threads)


def test_pipeline_renders_with_the_onnx_engine(tpl, models, track, tmp_path):
    from heygem_watch.media import probe
    from heygem_watch.pipeline import RecordingJob, run_task

    eng = OnnxEngine(models["pattern"])
    job = RecordingJob(Path("rec.wav"), tmp_path, AudioTrack.from_array(track.all(), tmp_path / "a", write_m4a=True))
    out = tmp_path / "out.mp4"
    res = run_task(job, tpl.path, eng, out, tmp_path / "tmp", tpl.cache_dir.parents[1])
    info = probe(out)
    assert res.frames == round(track.duration * tpl.fps) and info.has_video and info.has_audio
    assert (info.width, info.height) == (tpl.width, tpl.height)


def test_a_short_recording_on_a_longer_template_needs_only_its_frames(models, track, tmp_path):
    """The pipeline tracks the shown frames (and every 3rd after them): each shown frame gets its box and paste."""
    from heygem_watch.media import iter_video_frames
    from heygem_watch.pipeline import RecordingJob, run_task
    from heygem_watch.template import load_template
    from tests import gen_media

    video = gen_media.face_video(tmp_path / "long.mp4", n=60, size=(256, 288))
    eng = OnnxEngine(models["pattern"])
    job = RecordingJob(Path("rec.wav"), tmp_path, AudioTrack.from_array(track.all(), tmp_path / "a", write_m4a=True))
    res = run_task(job, video, eng, tmp_path / "out.mp4", tmp_path / "tmp", tmp_path / "cache")
    tpl = load_template(video, tmp_path / "cache", duration_s=track.duration)
    assert tpl.cache_hit and not tpl.complete and res.frames <= tpl.tracked_prefix < 60
    state = eng.prepare_template(tpl)
    assert state.valid[:res.frames].all() and not state.valid[~tpl.tracked].any()
    for i, frame in enumerate(iter_video_frames(tmp_path / "out.mp4")):
        x1, y1, x2, y2 = state.boxes[i]
        assert np.abs(frame[y1:y2, x1:x2].astype(int) - tpl.frame(i)[y1:y2, x1:x2]).mean() > 5  # pasted
    assert i + 1 == res.frames


def test_bad_models_are_named(tmp_path, models):
    txt = tmp_path / "notes.onnx"
    txt.write_text("not a model")
    with pytest.raises(EngineError, match="notes.onnx"):
        OnnxEngine(txt)
    with pytest.raises(EngineError, match="not found"):
        OnnxEngine(tmp_path / "missing.onnx")
    other = tiny_model(tmp_path / "other.onnx", "identity", inputs=("mel", "img"))
    with pytest.raises(EngineError, match="export-model"):
        OnnxEngine(other)
    with pytest.raises(EngineError, match="unknown onnx provider"):
        OnnxEngine(models["identity"], provider="vulkan")
    side = tmp_path / "sd.json"
    tiny_model(tmp_path / "sd.onnx", "identity")
    side.write_text('{"format": "wav2lip", "face_size": 256}')
    with pytest.raises(EngineError, match="96x96"):
        OnnxEngine(tmp_path / "sd.onnx")


def test_frame_rate_is_exact_for_ntsc(models, track):
    spec = mel.MelSpectrogram(track)
    fps = Fraction(30000, 1001)
    starts = [mel.window_start(i, fps, spec.n_cols) for i in range(20)]
    assert starts == [min(i * 80 * 1001 // 30000, spec.n_cols - 16) for i in range(20)]
    assert isinstance(mel.MelSource(track).cursor(), mel.MelSpectrogram)


def test_gpu_path_pads_partial_batches_to_one_shape(tpl, models, track):
    eng = OnnxEngine(models["identity"], batch_size=4)
    state = eng.prepare_template(tpl)
    speech = eng.analyse_speech(track)
    ref = list(eng.render(tpl, state, speech, jobs_for(tpl, 11)))
    eng.device = "gpu"  # the padding rule only; the session itself stays on CPU here
    rec = Recorder(eng.session)
    eng.session = rec
    got = list(eng.render(tpl, state, speech, jobs_for(tpl, 11)))
    assert set(rec.batches) == {4}  # every run had the same input shape, partial batches included
    assert all(np.array_equal(a, b) for a, b in zip(ref, got)) and len(got) == 11


# ---- face tracker: SCRFD beside the model, MediaPipe otherwise -------------------------------------------------
class LogRecorder:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def info(self, event, **kw):
        self.events.append((event, kw))

    warning = info

    def get(self, event) -> dict:
        return next(kw for e, kw in self.events if e == event)


def scrfd_beside(tmp_path: Path, tpl, box, name: str = "scrfd_2.5g_bnkps.onnx", size=(320, 320)) -> Path:
    """A constant SCRFD-layout model in tmp_path that finds `box` (template pixels) in every frame."""
    from heygem_watch.engines.onnx.scrfd import letterbox
    from tests.test_onnx_scrfd import scrfd_model

    _, (sx, sy) = letterbox(np.zeros((tpl.height, tpl.width, 3), np.uint8), size)
    return scrfd_model(tmp_path / name, [(np.asarray(box, np.float64) * (sx, sy, sx, sy), 0.9, 8)], size=size)


def test_face_tracker_is_mediapipe_without_a_detector(models, tpl, tmp_path):
    log = LogRecorder()
    eng = OnnxEngine(models["identity"], log=log)
    assert eng.face_tracker == "mediapipe" and eng.detector is None
    ev = log.get("face_tracker")
    assert ev["face_tracker"] == "mediapipe" and "scrfd*.onnx" in ev["reason"]
    state = eng.prepare_template(tpl)
    boxes, valid = face_boxes(tpl.landmarks, tpl.face_found, tpl.width, tpl.height)
    assert np.array_equal(state.boxes, boxes) and np.array_equal(state.valid, valid)
    tiny_model(tmp_path / "w2l.onnx", "identity")
    scrfd_beside(tmp_path, tpl, (10, 10, 90, 90))
    forced = OnnxEngine(tmp_path / "w2l.onnx", detector="mediapipe", log=log)
    assert forced.face_tracker == "mediapipe" and forced.describe()["face_tracker"] == "mediapipe"


def test_scrfd_beside_the_model_gives_padded_smoothed_boxes(tpl, track, tmp_path):
    from heygem_watch.engines.onnx.crop import pad_and_smooth

    mp_raw, _ = face_boxes(tpl.landmarks, tpl.face_found, tpl.width, tpl.height, pads=(0, 0, 0, 0), smooth=1)
    k0 = int(np.flatnonzero(tpl.face_found)[0])
    box = mp_raw[k0] + np.array([-6, -12, 6, 4])  # an SCRFD-like box: a little larger than the landmark one
    model = tiny_model(tmp_path / "wav2lip_gan.onnx", "pattern")
    det = scrfd_beside(tmp_path, tpl, box)
    log = LogRecorder()
    eng = OnnxEngine(model, log=log, batch_size=3)
    assert eng.face_tracker == "scrfd" and eng.describe()["detector"] == det.name
    assert log.get("face_tracker")["reason"] == f"{det.name} found beside the model"
    real = eng.detector.face_box
    calls = []

    def lose_frame_2(image):  # the detector misses the face in template frame 2
        calls.append(1)
        return None if len(calls) == 3 else real(image)

    eng.detector.face_box = lose_frame_2
    state = eng.prepare_template(tpl)
    assert len(calls) == tpl.n_frames
    found = np.ones(tpl.n_frames, bool)
    found[2] = False
    want, _ = pad_and_smooth(np.repeat(box[None], tpl.n_frames, 0), found, tpl.width, tpl.height)
    assert np.array_equal(state.boxes[found], want[found])
    assert np.array_equal(state.valid, found & tpl.face_found)  # MediaPipe-less frames stay out (paste mask)
    x1, y1, x2, y2 = state.boxes[k0]
    assert (x1, y1, x2, y2) == (box[0], box[1], box[2], box[3] + BOX_PADS[1])  # padded 10 px below the chin
    cache = tpl.cache_dir / f"scrfd-{eng.detector_fp}.npz"
    try:
        assert cache.is_file() and log.get("face_boxes_detected")["found"] == tpl.n_frames - 1
        again = OnnxEngine(model, log=LogRecorder())
        again.detector.face_box = None  # a cache hit runs no detection
        state2 = again.prepare_template(tpl)
        assert np.array_equal(state2.boxes, state.boxes) and np.array_equal(state2.valid, state.valid)
        out = list(eng.render(tpl, state, eng.analyse_speech(track), jobs_for(tpl, 4)))
        assert np.array_equal(out[2], tpl.frame(2))  # no SCRFD face: unchanged
        for k in (0, 1, 3):
            diff = np.abs(out[k].astype(int) - tpl.frame(k)).max(2)
            outside = np.ones_like(diff, bool)
            outside[y1:y2, x1:x2] = False
            assert diff[outside].max() == 0 and diff.max() > 20  # pasted inside the SCRFD box only
    finally:
        cache.unlink(missing_ok=True)


def test_explicit_detector_and_a_box_on_another_face(tpl, tmp_path):
    model = tiny_model(tmp_path / "w2l.onnx", "identity")
    elsewhere = tmp_path / "det"
    elsewhere.mkdir()
    corner = scrfd_beside(elsewhere, tpl, (2, 2, 60, 70), name="my_detector.onnx")  # not where the mouth is
    eng = OnnxEngine(model, detector=corner, log=LogRecorder())
    assert eng.face_tracker == "scrfd"
    try:
        state = eng.prepare_template(tpl)
        assert not state.valid.any()  # the landmarks' mouth is outside every box: nothing is pasted
    finally:
        (tpl.cache_dir / f"scrfd-{eng.detector_fp}.npz").unlink(missing_ok=True)
    with pytest.raises(EngineError, match="missing.onnx: face detector file not found"):
        OnnxEngine(model, detector=tmp_path / "missing.onnx")


def test_a_wrong_detector_beside_the_model_is_refused_by_name(tmp_path):
    from tests.test_onnx_scrfd import scrfd_model

    model = tiny_model(tmp_path / "w2l.onnx", "identity")
    scrfd_model(tmp_path / "det_500m.onnx", kps=False, out_widths=[4, 1])
    with pytest.raises(EngineError, match="det_500m.onnx: not an SCRFD face detector"):
        OnnxEngine(model, log=LogRecorder())
