"""pipeline.py: frame timing, ping-pong, atomic output, fan-out, cancellation."""
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from heygem_watch import pipeline
from heygem_watch.engines.base import Engine
from tests import mediagen


class Passthrough(Engine):
    name = "passthrough"

    def __init__(self):
        self.speech_calls = 0

    def analyse_speech(self, audio):
        self.speech_calls += 1
        return audio.duration

    def render(self, template, state, speech, jobs):
        for j in jobs:
            yield j.image


def test_pingpong_never_jumps():
    for n in (1, 2, 3, 10):
        seq = [pipeline.pingpong_index(i, n) for i in range(5 * n + 3)]
        assert all(0 <= k < n for k in seq)
        assert all(abs(a - b) <= 1 for a, b in zip(seq, seq[1:]))
        if n > 1:
            assert seq[:n] == list(range(n)) and seq[n] == n - 2


@pytest.mark.parametrize("fps", [Fraction(1350, 61), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(60)])
def test_frame_timing_stays_within_one_frame_over_ten_minutes(fps):
    duration = 600.0 + 0.0123
    n = pipeline.frame_count(duration, fps)
    assert abs(n / fps - duration) <= 0.5 / fps
    # frame i is shown at exactly i/fps: no accumulated rounding over 10 minutes
    last = n - 1
    assert abs(float(Fraction(last) / fps) - last / float(fps)) < 1e-9


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("p")
    tpl = mediagen.write_video(d / "tpl a.mp4", mediagen.face_frames(12, size=(160, 192)), Fraction(1350, 61))
    audio = mediagen.speech_like(3.0)
    rec = mediagen.write_video(d / "-rec 'quoted' 录音.flv", (np.zeros((64, 64, 3), np.uint8) for _ in range(75)), 25,
                               audio=audio)
    return d, tpl, rec


def test_output_has_template_geometry_and_audio_length(media, tmp_path):
    d, tpl, rec = media
    eng = Passthrough()
    out = tmp_path / "out dir" / "o.mp4"
    res = pipeline.process_files(rec, [tpl], [out], eng, var_dir=tmp_path / "var")
    assert isinstance(res[0], pipeline.RenderResult), res
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.width, v.codec_context.height) == (192, 160)
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert v.average_rate == Fraction(1350, 61)
        n = sum(1 for _ in c.decode(v))
    assert abs(n / (1350 / 61) - 3.0) <= 1 / (1350 / 61)
    assert res[0].frames == n
    # nothing left behind in the work area
    assert not list((tmp_path / "var" / "tmp").glob("**/*.mp4"))


def test_a_phone_template_stored_sideways_gives_an_upright_output(media, tmp_path):
    from heygem_watch.display import UPRIGHT, frame_orientation

    d, tpl, rec = media
    shown = list(mediagen.face_frames(12, size=(160, 192)))
    phone = mediagen.write_video(tmp_path / "phone.mp4", [np.ascontiguousarray(np.rot90(f, -1)) for f in shown],
                                 Fraction(1350, 61), display=(90, False))
    out = tmp_path / "o.mp4"
    res = pipeline.process_files(rec, [phone], [out], Passthrough(), var_dir=tmp_path / "var")
    assert isinstance(res[0], pipeline.RenderResult), res
    with av.open(str(out)) as c:
        first = next(c.decode(video=0))
        assert (first.width, first.height) == (192, 160) and frame_orientation(first) == (UPRIGHT, None)
        img = first.to_ndarray(format="bgr24").astype(int)  # two lossy encodings from the picture shown
        assert np.abs(img - shown[0]).mean() < 8 < np.abs(img - shown[0][::-1, ::-1]).mean()


def test_max_side_scales_a_large_template_down_for_the_output(media, tmp_path):
    from heygem_watch.config import EncoderSettings

    d, tpl, rec = media  # 192 x 160
    out = tmp_path / "o.mp4"
    res = pipeline.process_files(rec, [tpl], [out], Passthrough(), var_dir=tmp_path / "var",
                                 encoder=EncoderSettings(max_side=96))
    assert isinstance(res[0], pipeline.RenderResult), res
    with av.open(str(out)) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (96, 80)


def _output_colour(path):
    with av.open(str(path)) as c:
        f = next(c.decode(video=0))
        return (f.colorspace, f.color_primaries, f.color_trc, f.color_range), f.to_ndarray(format="bgr24")


@pytest.mark.parametrize("tags, said", [((6, 6, 6, 1), (6, 6, 6, 1)), ((1, 1, 1, 2), (1, 1, 1, 1)),
                                        ((2, 2, 2, 0), (2, 2, 2, 0))],
                         ids=["bt601 at 720p", "full range (made limited)", "untagged"])
def test_an_output_says_how_its_template_is_coloured(media, tmp_path, tags, said):
    d, tpl, rec = media
    t = mediagen.write_video(tmp_path / "tpl.mp4", list(mediagen.face_frames(4, size=(720, 1280))), 25, colour=tags)
    out = tmp_path / "o.mp4"
    res = pipeline.process_files(rec, [t], [out], Passthrough(), var_dir=tmp_path / "var")
    assert isinstance(res[0], pipeline.RenderResult), res
    got, bgr = _output_colour(out)
    assert got == said  # players read the bytes as the template's were read, not by a guess from the size
    src, src_bgr = _output_colour(t)
    assert src == tags and np.abs(bgr.astype(int) - src_bgr).mean() < 2  # the picture the template shows


def test_a_still_photo_output_says_bt601_and_srgb(media, tmp_path):
    import cv2

    d, tpl, rec = media
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), next(mediagen.face_frames(1, size=(720, 640))))  # taller than 576: guessed BT.709
    out = tmp_path / "o.mp4"
    res = pipeline.process_files(rec, [photo], [out], Passthrough(), var_dir=tmp_path / "var")
    assert isinstance(res[0], pipeline.RenderResult), res
    assert _output_colour(out)[0] == (6, 1, 13, 1)  # OpenCV's BGR -> I420 is BT.601, limited range


def _x264_options(path) -> str:
    """The settings line x264 writes into the stream (an SEI message): what the encoder really ran with."""
    data = path.read_bytes()
    i = data.index(b"options: ")
    return data[i: data.index(b"\x00", i)].decode("ascii", "replace")


def test_encoder_settings_reach_x264(media, tmp_path):
    d, tpl, rec = media
    default, custom = tmp_path / "default.mp4", tmp_path / "custom.mp4"
    pipeline.process_files(rec, [tpl], [default], Passthrough(), var_dir=tmp_path / "var")
    opts = _x264_options(default)
    # superfast's own motion search and subpixel refinement, with veryfast's rate control put back
    assert "me=dia" in opts and "subme=1" in opts and "mbtree=1" in opts and "rc_lookahead=10" in opts
    assert "crf=17.0" in opts
    enc = pipeline.EncoderSettings(preset="veryfast", crf=23, params="")
    pipeline.process_files(rec, [tpl], [custom], Passthrough(), var_dir=tmp_path / "var", encoder=enc)
    opts = _x264_options(custom)
    assert "me=hex" in opts and "subme=2" in opts and "crf=23.0" in opts


def test_a_prefetch_started_by_the_caller_is_used(media, tmp_path):
    """The CLI starts the templates' analysis before building its engine and hands it to process_files."""
    d, tpl, rec = media
    cache = tmp_path / "cache"
    pre = pipeline.Prefetch(rec, [tpl], cache)
    pre.wait(0)
    seconds, hit = pre.analysis[0]
    assert not hit and seconds > 0
    res = pipeline.process_files(rec, [tpl], [tmp_path / "a.mp4"], Passthrough(), cache_dir=cache, prefetch=pre)[0]
    assert not res.template_cache_hit and res.template_analysis_s >= seconds  # the cold analysis, reported
    assert len(list((cache / "templates").iterdir())) == 1


def test_a_prefetch_of_an_unreadable_recording_ends_without_analysing(media, tmp_path):
    """The recording is probed on the prefetch thread: a bad one must still release wait(), not raise there."""
    d, tpl, _ = media
    bad = tmp_path / "bad.flv"
    bad.write_text("not a video")
    for rec in (bad, tmp_path / "missing.flv"):
        pre = pipeline.Prefetch(rec, [tpl, tpl], tmp_path / "cache")
        pre.join()
        assert all(ev.is_set() for ev in pre._done)  # (checked, not waited on: a failure would hang wait())
        assert pre.analysis == {} and not (tmp_path / "cache").exists()


def test_fan_out_takes_audio_once(media, tmp_path):
    d, tpl, rec = media
    eng = Passthrough()
    job = pipeline.RecordingJob.prepare(rec, tmp_path / "w")
    for k in range(3):
        pipeline.run_task(job, tpl, eng, tmp_path / f"o{k}.mp4", tmp_path / "w", tmp_path / "cache")
    assert eng.speech_calls == 1
    assert all((tmp_path / f"o{k}.mp4").exists() for k in range(3))


def test_first_run_reports_the_analysis_and_the_second_a_cache_hit(media, tmp_path):
    d, tpl, rec = media
    var = tmp_path / "var"
    first = pipeline.process_files(rec, [tpl], [tmp_path / "a.mp4"], Passthrough(), var_dir=var)[0]
    second = pipeline.process_files(rec, [tpl], [tmp_path / "b.mp4"], Passthrough(), var_dir=var)[0]
    assert not first.template_cache_hit and first.template_analysis_s > 0
    assert second.template_cache_hit and second.template_analysis_s < first.template_analysis_s / 5


def test_cancel_leaves_no_file(media, tmp_path):
    d, tpl, rec = media
    job = pipeline.RecordingJob.prepare(rec, tmp_path / "w")
    ev = threading.Event()
    ev.set()
    with pytest.raises(pipeline.Cancelled):
        pipeline.run_task(job, tpl, Passthrough(), tmp_path / "o.mp4", tmp_path / "w", tmp_path / "cache", cancel=ev)
    assert not (tmp_path / "o.mp4").exists()
    assert not list((tmp_path / "w").glob("*.mp4"))


def test_one_bad_template_does_not_stop_the_others(media, tmp_path):
    d, tpl, rec = media
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    res = pipeline.process_files(rec, [bad, tpl], [tmp_path / "a.mp4", tmp_path / "b.mp4"], Passthrough(), var_dir=tmp_path / "v")
    assert isinstance(res[0], Exception) and "notes.mp4" in str(res[0])
    assert isinstance(res[1], pipeline.RenderResult) and (tmp_path / "b.mp4").exists()


def test_a_failing_speech_analysis_fails_each_template_and_runs_once(media, tmp_path):
    """The speech analysis is the recording's: when it fails (a missing model), every template reports that failure,
    and it is not attempted again per template."""
    d, tpl, rec = media

    class NoSpeech(Passthrough):
        def analyse_speech(self, audio):
            self.speech_calls += 1
            raise RuntimeError("speech model missing")

    eng = NoSpeech()
    res = pipeline.process_files(rec, [tpl, tpl], [tmp_path / "a.mp4", tmp_path / "b.mp4"], eng, var_dir=tmp_path / "v")
    assert [str(r) for r in res] == ["speech model missing"] * 2
    assert eng.speech_calls == 1 and not (tmp_path / "a.mp4").exists()


class YuvPassthrough(Passthrough):
    """Returns the template frames as the pipeline hands them (yuv420p), or, with cut, a malformed one."""

    def __init__(self, cut: int = 0):
        super().__init__()
        self.cut = cut

    def render(self, template, state, speech, jobs):
        for j in jobs:
            yield j.yuv[: len(j.yuv) - self.cut]


def _decoded(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="yuv420p")[: f.height].astype(np.float32)  # the luma plane as coded
                         for f in c.decode(c.streams.video[0])])


def test_engines_may_return_yuv420p_frames(media, tmp_path):
    """A yuv420p frame is encoded as it is: losslessly encoded (crf 0), the output is the template's cached frames to
    the bit, where the BGR path (every frame converted to BGR and back) is not."""
    from heygem_watch.template import load_template

    d, tpl, rec = media
    lossless = pipeline.EncoderSettings(preset="ultrafast", crf=0, params="")
    a, b = tmp_path / "bgr.mp4", tmp_path / "yuv.mp4"
    pipeline.process_files(rec, [tpl], [a], Passthrough(), var_dir=tmp_path / "v", encoder=lossless)
    res = pipeline.process_files(rec, [tpl], [b], YuvPassthrough(), var_dir=tmp_path / "v", encoder=lossless)
    assert isinstance(res[0], pipeline.RenderResult), res
    cached = load_template(tpl, tmp_path / "v" / "cache" / "templates")
    fa, fb = _decoded(a), _decoded(b)
    shown = np.stack([cached.yuv(pipeline.pingpong_index(i, cached.n_frames))[: cached.height]
                      for i in range(len(fb))]).astype(np.float32)
    assert fa.shape == fb.shape == shown.shape
    assert np.array_equal(fb, shown) and not np.array_equal(fa, shown)


def test_a_malformed_yuv_frame_fails_the_template_with_its_size_named(media, tmp_path):
    d, tpl, rec = media
    out = tmp_path / "o.mp4"
    res = pipeline.process_files(rec, [tpl], [out], YuvPassthrough(cut=2), var_dir=tmp_path / "v")
    assert isinstance(res[0], Exception) and "yuv420p frame of shape (238, 192)" in str(res[0])
    assert "192x160" in str(res[0]) and not out.exists()


class Recorder(Passthrough):
    """Notes the tracked frame count of each template state it prepares."""

    def __init__(self):
        super().__init__()
        self.prepared = []

    def prepare_template(self, template):
        self.prepared.append(int(template.tracked.sum()))
        return len(self.prepared)


def _recording(path, seconds):
    n = int(round(seconds * 25))
    return mediagen.write_video(path, (np.zeros((64, 64, 3), np.uint8) for _ in range(n)), 25,
                                audio=mediagen.speech_like(seconds))


def test_a_short_recording_tracks_its_frames_then_a_longer_one_extends_them(media, tmp_path):
    from heygem_watch.template import SMOOTH_MARGIN, tracked_set

    d, _, long_rec = media  # 3 s: longer than the template
    tpl = mediagen.write_video(tmp_path / "long tpl.mp4", mediagen.face_frames(50, size=(160, 192)), 25)
    cache, eng = tmp_path / "cache", Recorder()
    short = pipeline.RecordingJob.prepare(_recording(tmp_path / "short.flv", 0.6), tmp_path / "w1")
    res = pipeline.run_task(short, tpl, eng, tmp_path / "a.mp4", tmp_path / "w1", cache)
    n_out = pipeline.frame_count(short.track.duration, Fraction(25))
    assert res.frames == n_out < 20 and res.face_fraction == 1.0
    t = pipeline.load_template(tpl, cache, duration_s=short.track.duration)
    assert t.cache_hit and not t.complete
    assert t.tracked.tolist() == tracked_set(50, n_out + SMOOTH_MARGIN).tolist()
    assert eng.prepared == [t.tracked.sum()]
    pipeline.run_task(short, tpl, eng, tmp_path / "a2.mp4", tmp_path / "w1", cache)
    assert len(eng.prepared) == 1  # same tracked frames: the state is reused
    longer = pipeline.RecordingJob.prepare(_recording(tmp_path / "longer.flv", 1.2), tmp_path / "w2")
    pipeline.run_task(longer, tpl, eng, tmp_path / "b.mp4", tmp_path / "w2", cache)
    n_longer = pipeline.frame_count(longer.track.duration, Fraction(25))
    assert eng.prepared[1:] == [tracked_set(50, n_longer + SMOOTH_MARGIN).sum()]  # extended: a new state
    job = pipeline.RecordingJob.prepare(long_rec, tmp_path / "w3")
    res = pipeline.run_task(job, tpl, eng, tmp_path / "c.mp4", tmp_path / "w3", cache)  # ping-pong: everything
    assert eng.prepared[2:] == [50] and res.frames == 75


def test_frames_past_the_tracked_prefix_are_refused(media, tmp_path):
    tpl = mediagen.write_video(tmp_path / "t.mp4", mediagen.face_frames(30, size=(160, 192)), 25)
    t = pipeline.load_template(tpl, tmp_path / "cache", duration_s=0.2)
    assert t.tracked_prefix == 8
    assert len(list(pipeline._jobs(t, 8, Fraction(25), None))) == 8
    with pytest.raises(RuntimeError, match="8 frames tracked, 9 needed"):
        list(pipeline._jobs(t, 9, Fraction(25), None))
