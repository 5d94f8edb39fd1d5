"""Media I/O with PyAV (FFmpeg in-process): probing, streaming decode, and the MP4 writer.

Frames cross module boundaries as (H, W, 3) uint8 BGR arrays (OpenCV order). Colour conversion uses BT.601
limited range both ways (OpenCV's I420 conversions and swscale's default agree to < 1 level).
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from heygem_watch import display
from heygem_watch.config import EncoderSettings  # noqa: F401  (one definition; config.py stays import-light)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".flv", ".m4v", ".ts")
DEFAULT_FPS = Fraction(25)  # stills and streams that do not state a rate
AUDIO_BITRATE = 160_000  # only used when audio has to be re-encoded
WRITER_QUEUE = 8  # frames buffered between the renderer and the encoder thread
SIZE_PROBE_PACKETS = 64  # probe() reads at most this many video packets for a first frame (a damaged stream)


class MediaError(Exception):
    """A media file cannot be used; str() names the file and the reason."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class MediaInfo:
    path: Path
    has_video: bool
    has_audio: bool
    duration: float  # seconds; 0.0 when unknown
    width: int = 0
    height: int = 0
    fps: Fraction | None = None
    video_codec: str | None = None
    audio_codec: str | None = None
    is_image: bool = False
    start_time: float = 0.0  # seconds, the container's timeline origin


def open_container(path: Path):
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except FileNotFoundError:
        raise MediaError(path, "file not found") from None
    except PermissionError:
        raise MediaError(path, "permission denied (cannot read the file)") from None
    except av.error.FFmpegError as exc:
        raise MediaError(path, f"not a readable audio/video file ({exc.strerror or exc})") from None


def probe(path: os.PathLike | str, shown_size: bool = True) -> MediaInfo:
    """Stream layout and duration. Raises MediaError for empty, unreadable or non-media files.
    shown_size: width/height as players show the video (reads its first frame: ~30 ms at 1080p); False gives the
    stored size, for callers that want only the duration."""
    path = Path(path)
    if not path.exists():
        raise MediaError(path, "file not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty (0 bytes)")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        import cv2

        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise MediaError(path, "not a readable image")
        h, w = img.shape[:2]
        return MediaInfo(path, True, False, 0.0, w, h, DEFAULT_FPS, "image", None, is_image=True)
    with open_container(path) as c:
        vs = c.streams.video[0] if c.streams.video else None
        as_ = c.streams.audio[0] if c.streams.audio else None
        if vs is None and as_ is None:
            raise MediaError(path, "contains no audio or video stream")
        duration = float(c.duration / 1_000_000) if c.duration else 0.0
        start = float(c.start_time / 1_000_000) if c.start_time else 0.0
        info = MediaInfo(path, vs is not None, as_ is not None, duration, start_time=start)
        if vs is not None:
            info.width, info.height = vs.codec_context.width, vs.codec_context.height
            if shown_size:
                info.width, info.height = _shown_size(c, vs)
            info.fps = stream_fps(vs)
            info.video_codec = vs.codec_context.name
        if as_ is not None:
            info.audio_codec = as_.codec_context.name
        return info


def _shown_size(container, vs) -> tuple[int, int]:
    """(width, height) as players show the stream (display.Look.shown_size: non-square pixels made square, a quarter
    turn swaps them). Reads the first frame (the matrix travels with frames); the stored size when that frame
    cannot be decoded."""
    import av

    w, h = vs.codec_context.width, vs.codec_context.height
    try:
        for n, packet in enumerate(container.demux(vs)):
            for frame in packet.decode():
                return display.look_of(frame, vs).shown_size(w, h)
            if n >= SIZE_PROBE_PACKETS:
                break
    except (av.error.FFmpegError, ValueError):
        pass
    return w, h


def stream_fps(stream) -> Fraction:
    """A video stream's frame rate as an exact fraction (e.g. 30000/1001), DEFAULT_FPS when unknown."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 1 <= float(rate) <= 240:
            return Fraction(rate.numerator, rate.denominator).limit_denominator(100_000)
    return DEFAULT_FPS


def iter_video_frames(path: os.PathLike | str, fmt: str = "bgr24", errors: list | None = None) -> Iterator[np.ndarray]:
    """Decode every video frame in order as (H, W, C) arrays of a packed format (bgr24, rgb24, gray), streaming,
    as players show it (display.py: upright, HDR made SDR). Corrupt packets (a truncated file) end the stream early;
    the reason is appended to `errors` when given, so callers can say what happened."""
    import av

    path = Path(path)
    with open_container(path) as c:
        if not c.streams.video:
            raise MediaError(path, "has no video stream")
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        look = None
        try:
            for frame in c.decode(vs):
                if look is None:  # one per stream: the first frame's
                    look = display.look_of(frame)
                yield display.picture(frame, look, fmt)
        except av.error.FFmpegError as exc:
            if errors is not None:
                errors.append(f"video decoding stopped early: {exc.strerror or exc}")


def even_size(width: int, height: int) -> tuple[int, int]:
    """H.264 4:2:0 needs even dimensions; odd ones lose their last row/column."""
    return width - width % 2, height - height % 2


@dataclass
class _AudioSource:
    container: object
    stream: object
    packets: Iterator = field(default=None)  # type: ignore[assignment]
    pending: object = None


class VideoWriter:
    """MP4 writer: H.264 yuv420p video from BGR frames + AAC audio copied (not re-encoded) from an .m4a file,
    tagged with `colour` (how its yuv420p is read: the template's, display.Colour) when given.

    Encoding runs on its own thread behind a bounded queue, so the renderer and x264 overlap. The file is
    written with +faststart. Call close() to finish; abort() to stop and delete the partial file.
    """

    def __init__(self, path: os.PathLike | str, width: int, height: int, fps: Fraction,
                 audio_m4a: os.PathLike | str | None = None, encoder: EncoderSettings | None = None,
                 colour: display.Colour | None = None):
        import av

        self.path = Path(path)
        self.width, self.height = even_size(width, height)
        self.fps = Fraction(fps)
        enc = encoder or EncoderSettings()
        self._out = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
        vs = self._out.add_stream("libx264", rate=self.fps)
        vs.width, vs.height, vs.pix_fmt = self.width, self.height, "yuv420p"
        self._tb = Fraction(1, 1) / self.fps
        vs.codec_context.time_base = self._tb
        options = {"crf": str(enc.crf), "preset": enc.preset}
        if enc.params:
            options["x264-params"] = enc.params
        vs.codec_context.options = options
        vs.codec_context.thread_count = enc.threads
        if colour is not None:  # said in the stream (x264's VUI) and the MP4 (colr): players need not guess
            cc = vs.codec_context
            cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = (
                colour.matrix, colour.primaries, colour.trc, colour.range)
        self._vs = vs
        self._audio: _AudioSource | None = None
        if audio_m4a is not None:
            ac = av.open(str(audio_m4a))
            a_in = ac.streams.audio[0]
            a_out = self._out.add_stream_from_template(a_in)
            self._audio = _AudioSource(ac, a_in)
            self._audio.packets = ac.demux(a_in)
            self._a_out = a_out
        self._n = 0
        self._q: queue.Queue = queue.Queue(maxsize=WRITER_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode_loop, name="encoder", daemon=True)
        self._thread.start()

    @property
    def frames_written(self) -> int:
        return self._n

    def write(self, frame: np.ndarray) -> None:
        """Queue one frame: (H, W, 3) uint8 BGR (cropped to even size if needed) or yuv420p (H * 3 / 2, W) uint8 at
        the writer's size (encoded as it is: no colour conversion)."""
        if self._error is not None:
            raise self._error
        if frame.ndim == 2:
            if frame.shape != (self.height * 3 // 2, self.width):
                raise ValueError(f"yuv420p frame of shape {frame.shape}, the output is {self.width}x{self.height}")
        elif frame.shape[0] != self.height or frame.shape[1] != self.width:
            frame = frame[: self.height, : self.width]
        self._q.put(frame)
        self._n += 1

    def _encode_loop(self) -> None:
        import av
        import cv2

        try:
            i = 0
            while True:
                item = self._q.get()
                if item is None:
                    break
                yuv = np.ascontiguousarray(item) if item.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(item),
                                                                                    cv2.COLOR_BGR2YUV_I420)
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts = i
                frame.time_base = self._tb
                for pkt in self._vs.encode(frame):
                    self._out.mux(pkt)
                i += 1
                self._mux_audio_until(i / self.fps)
            for pkt in self._vs.encode(None):
                self._out.mux(pkt)
        except BaseException as exc:  # surfaced to the producer on its next write()/close()
            self._error = exc
            while True:  # drain so a blocked producer wakes up
                try:
                    if self._q.get_nowait() is None:
                        break
                except queue.Empty:
                    break

    def _mux_audio_until(self, t: Fraction | float | None) -> None:
        """Copy audio packets whose start lies before t seconds (all of them when t is None)."""
        src = self._audio
        if src is None:
            return
        while True:
            pkt = src.pending
            if pkt is None:
                pkt = next(src.packets, None)
                if pkt is None:
                    return
            if pkt.dts is None or pkt.size == 0:
                src.pending = None
                continue
            if t is not None and pkt.pts is not None and pkt.pts * pkt.time_base > t:
                src.pending = pkt
                return
            src.pending = None
            pkt.stream = self._a_out
            self._out.mux(pkt)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            self._mux_audio_until(None)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop without finishing; the partial file is removed."""
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._q.put(None)
        self._thread.join(timeout=30)
        try:
            self._release()
        except Exception:
            pass
        self.path.unlink(missing_ok=True)

    def _release(self) -> None:
        try:
            self._out.close()
        finally:
            if self._audio is not None:
                self._audio.container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
