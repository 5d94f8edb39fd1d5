"""Audio: take a recording's sound once, on the recording's own timeline.

extract_audio() decodes the recording's first audio stream in one streaming pass and writes two files to the
recording's work folder:
  audio16k.f32  raw little-endian float32 mono at SAMPLE_RATE: what every engine analyses
  audio.m4a     AAC at the source rate (mono/stereo): what every output copies, packet for packet
Sample 0 of both is the container's timeline origin (the earliest stream start), so an FLV whose timestamps start at
3.2 s, or an AAC stream with priming, lines up with the video it was recorded with. Gaps in the timestamps become
silence; overlaps are dropped. Nothing proportional to the recording's length stays in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from heygem_watch.media import AUDIO_BITRATE, MediaError, open_container, probe

SAMPLE_RATE = 16000  # Hz, what speech analysis and Wav2Lip models expect
PCM_NAME = "audio16k.f32"
M4A_NAME = "audio.m4a"
INFO_NAME = "audio.json"
GAP_TOLERANCE_S = 0.010  # timestamp jitter below this is ignored (FLV has 1 ms timestamps)
MAX_LEADING_GAP_S = 600.0  # a later audio start than this is a broken timestamp, not silence
WAV_SHORT_S = 0.05  # a WAV whose data is this much shorter than its header says was cut off (a full disk)
MAX_PRIMING_SHIFT_S = 0.5  # a larger audio/video start difference is real content, not encoder priming
OUT_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# Decoded packets (~1024 samples) are encoded and resampled in blocks of this many seconds: each call into FFmpeg
# gives up the GIL and may wait a whole switch interval (5 ms) to get it back while a template is being analysed
# in another thread; per packet that was most of the audio step's time. The output bytes are the same.
EMIT_BLOCK_S = 0.5


@dataclass
class AudioTrack:
    """16 kHz mono float32 samples in a file; read windows of it without loading it all."""

    path: Path  # the raw .f32 file
    n_samples: int
    m4a_path: Path | None = None
    notes: tuple[str, ...] = ()
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.n_samples / self.sample_rate

    def read(self, start: int, count: int) -> np.ndarray:
        """Samples [start, start+count) as float32 (count,), zero-padded outside the signal."""
        return _window(start, count, self.n_samples, self._fetch)

    def _fetch(self, lo: int, hi: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(lo * 4)
            return np.frombuffer(f.read((hi - lo) * 4), dtype="<f4")

    def iter_chunks(self, seconds: float = 30.0) -> Iterator[tuple[int, np.ndarray]]:
        """(start_sample, samples) in order, each at most `seconds` long."""
        step = max(1, int(seconds * self.sample_rate))
        for start in range(0, self.n_samples, step):
            yield start, self.read(start, min(step, self.n_samples - start))

    def all(self) -> np.ndarray:
        """The whole signal; only for short audio (tests, analysis of a few minutes)."""
        return self.read(0, self.n_samples)

    @classmethod
    def from_array(cls, samples: np.ndarray, work_dir: os.PathLike | str, write_m4a: bool = False) -> "AudioTrack":
        """Build a track from 16 kHz mono samples (tests and tools)."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        pcm = work_dir / PCM_NAME
        samples = np.asarray(samples, dtype="<f4").reshape(-1)
        samples.tofile(pcm)
        m4a = None
        if write_m4a:
            m4a = work_dir / M4A_NAME
            _write_m4a_from_array(samples, m4a)
        return cls(pcm, len(samples), m4a)

    @classmethod
    def open(cls, work_dir: os.PathLike | str) -> "AudioTrack | None":
        """A track extract_audio() finished earlier in work_dir, or None."""
        work_dir = Path(work_dir)
        try:
            info = json.loads((work_dir / INFO_NAME).read_text())
            pcm, m4a = work_dir / PCM_NAME, work_dir / M4A_NAME
            if pcm.stat().st_size != info["n_samples"] * 4 or not m4a.exists():
                return None
            return cls(pcm, int(info["n_samples"]), m4a, tuple(info.get("notes", ())))
        except (OSError, ValueError, KeyError):
            return None


class ArrayTrack:
    """AudioTrack's reading interface over samples already in memory (clips of seconds to minutes: training,
    benches, the Wav2Lip mel of an array)."""

    def __init__(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE):
        self.samples = np.asarray(samples, np.float32).reshape(-1)
        self.n_samples, self.sample_rate = len(self.samples), sample_rate

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.n_samples / self.sample_rate

    def read(self, start: int, count: int) -> np.ndarray:
        """Samples [start, start+count) as float32 (count,), zero-padded outside the signal."""
        return _window(start, count, self.n_samples, lambda lo, hi: self.samples[lo:hi])


def _window(start: int, count: int, n_samples: int, fetch) -> np.ndarray:
    """(count,) float32: fetch(lo, hi) for the part inside [0, n_samples), zeros around it (a short fetch, from a
    file cut off under us, leaves zeros too)."""
    out = np.zeros(max(0, count), np.float32)
    lo, hi = max(0, start), min(n_samples, start + count)
    if hi > lo:
        data = fetch(lo, hi)
        out[lo - start: lo - start + len(data)] = data
    return out


class _Aligner:
    """Places decoded audio on the timeline: pads gaps with silence, drops overlaps.

    Gaps are measured on the decoder's side (each frame's timestamp against where the previous frame ended), not
    against what the resampler has put out so far: the resampler holds back a few input samples, which at a low
    source rate (1 kHz: 16 ms) looked like a gap."""

    def __init__(self, rate: int, origin: float):
        self.rate, self.origin, self.written = rate, origin, 0
        self.gaps = 0
        self._in_end: float | None = None  # input time (s) where the last decoded frame ended
        self._drop = 0  # output samples still to drop (an overlap larger than one resampled chunk)

    def frame(self, t: float | None, duration: float) -> int:
        """A decoded frame starting at t (s, None = unknown) lasting `duration` s: output samples to pad before
        its resampled audio (> 0) or to drop from it (< 0)."""
        ref = self._in_end if self._in_end is not None else self.origin
        shift = 0
        if t is not None:
            delta = t - ref
            if GAP_TOLERANCE_S < delta < MAX_LEADING_GAP_S:
                shift = int(round(delta * self.rate))
                self.gaps += 1
            elif delta < -GAP_TOLERANCE_S:
                shift = -int(round(-delta * self.rate))
        self._in_end = (t if t is not None else ref) + duration
        return shift

    def place(self, shift: int, data: np.ndarray) -> np.ndarray:
        """Resampled data (channels, n) -> samples to append (channels, m), after frame()'s shift."""
        if shift > 0:
            data = np.concatenate([np.zeros((data.shape[0], shift), np.float32), data], axis=1)
        self._drop += max(0, -shift)
        if self._drop:
            k = min(self._drop, data.shape[1])
            data, self._drop = data[:, k:], self._drop - k
        self.written += data.shape[1]
        return data


def extract_audio(recording: os.PathLike | str, work_dir: os.PathLike | str) -> AudioTrack:
    """Decode the recording's audio once (see module docstring). Raises MediaError naming the file and reason."""
    import av

    recording, work_dir = Path(recording), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not recording.exists():
        raise MediaError(recording, "file not found")
    if recording.stat().st_size == 0:
        raise MediaError(recording, "file is empty (0 bytes)")
    notes: list[str] = []
    with open_container(recording) as c:
        if not c.streams.audio:
            raise MediaError(recording, "has no audio track (nothing to lip-sync to)")
        stated_s = float(c.duration / 1_000_000) if c.duration else 0.0  # what probe() says, without a second open
        ain = c.streams.audio[0]
        origin = _timeline_origin(c, ain)
        src_rate = ain.codec_context.sample_rate or 48000
        out_rate = src_rate if src_rate in OUT_RATES else 48000
        channels = 1 if (ain.codec_context.channels or 1) == 1 else 2
        layout = "mono" if channels == 1 else "stereo"
        to_native = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        to_16k = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        align = _Aligner(out_rate, origin)
        pcm_path, m4a_path = work_dir / PCM_NAME, work_dir / M4A_NAME
        n16 = 0
        with open(pcm_path, "wb") as pcm, av.open(str(m4a_path), "w", format="mp4") as m4a:
            aout = m4a.add_stream("aac", rate=out_rate, layout=layout)
            aout.bit_rate = AUDIO_BITRATE
            enc_pts = 0
            pending: list[np.ndarray] = []

            def emit(block: np.ndarray, final: bool = False) -> None:
                if block.shape[1]:
                    pending.append(block)
                if pending and (final or sum(b.shape[1] for b in pending) >= EMIT_BLOCK_S * out_rate):
                    encode(np.concatenate(pending, axis=1))
                    pending.clear()

            def encode(block: np.ndarray) -> None:
                nonlocal n16, enc_pts
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, np.float32), format="fltp", layout=layout)
                frame.sample_rate = out_rate
                frame.pts = enc_pts
                enc_pts += block.shape[1]
                for pkt in aout.encode(frame):
                    m4a.mux(pkt)
                frame16 = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, np.float32), format="fltp", layout=layout)
                frame16.sample_rate = out_rate
                frame16.pts = None
                for r in to_16k.resample(frame16):
                    arr = r.to_ndarray().reshape(-1).astype("<f4")
                    arr.tofile(pcm)
                    n16 += len(arr)

            try:
                for packet in c.demux(ain):
                    try:
                        frames = packet.decode()
                    except av.error.FFmpegError as exc:
                        notes.append(f"skipped a corrupt audio packet ({exc.strerror or exc})")
                        continue
                    for frame in frames:
                        t = float(frame.pts * frame.time_base) if frame.pts is not None else None
                        shift = align.frame(t, frame.samples / (frame.sample_rate or src_rate))
                        for r in to_native.resample(frame):
                            emit(align.place(shift, r.to_ndarray()))
                            shift = 0  # later chunks of the same frame follow on directly
            except av.error.FFmpegError as exc:
                notes.append(f"recording is truncated or damaged; used the first {align.written / out_rate:.1f} s "
                             f"of audio ({exc.strerror or exc})")
            for r in to_native.resample(None):
                emit(align.place(0, r.to_ndarray()))
            emit(np.zeros((channels, 0), np.float32), final=True)
            for pkt in aout.encode(None):
                m4a.mux(pkt)
            for r in to_16k.resample(None):
                arr = r.to_ndarray().reshape(-1).astype("<f4")
                arr.tofile(pcm)
                n16 += len(arr)
    # Resampler latency can leave the 16 kHz track a few samples off the native one; make them agree exactly.
    want = int(round(align.written / out_rate * SAMPLE_RATE))
    if n16 != want:
        with open(pcm_path, "r+b") as pcm:
            if n16 > want:
                pcm.truncate(want * 4)
            else:
                pcm.seek(0, 2)
                np.zeros(want - n16, "<f4").tofile(pcm)
        n16 = want
    if n16 == 0:
        raise MediaError(recording, "audio track holds no decodable audio")
    if align.gaps:
        notes.append(f"filled {align.gaps} gap(s) in the audio timestamps with silence")
    if not any("truncated" in n for n in notes):
        notes += completeness_notes(recording, align.written / out_rate, stated_s)
    if float(np.abs(_peak(pcm_path, n16))) < 1e-4:
        notes.append("audio is silent: the avatar will keep its mouth closed")
    (work_dir / INFO_NAME).write_text(json.dumps({"n_samples": n16, "source": str(recording), "notes": notes,
                                                  "origin_s": origin, "rate": out_rate}))
    return AudioTrack(pcm_path, n16, m4a_path, tuple(notes))


def _timeline_origin(container, ain) -> float:
    """Time (s) that becomes sample 0. With video, the first video frame: muxers shift AAC priming in front of it
    (FLV cannot store negative timestamps), and the recording's picture starts there. Audio-only: the audio start."""
    a0 = float(ain.start_time * ain.time_base) if ain.start_time is not None else 0.0
    vs = container.streams.video[0] if container.streams.video else None
    if vs is not None and vs.start_time is not None:
        v0 = float(vs.start_time * vs.time_base)
        if abs(v0 - a0) < MAX_PRIMING_SHIFT_S:
            return v0
        return min(v0, a0)
    return a0


def _peak(pcm_path: Path, n: int, chunk: int = 1 << 20) -> float:
    peak = 0.0
    with open(pcm_path, "rb") as f:
        for _ in range(0, n, chunk):
            data = np.frombuffer(f.read(chunk * 4), dtype="<f4")
            if len(data):
                peak = max(peak, float(np.abs(data).max()))
    return peak


def _write_m4a_from_array(samples: np.ndarray, m4a_path: Path) -> None:
    import av

    with av.open(str(m4a_path), "w", format="mp4") as m4a:
        aout = m4a.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        aout.bit_rate = AUDIO_BITRATE
        step = 1024
        for s in range(0, len(samples), step):
            frame = av.AudioFrame.from_ndarray(samples[None, s:s + step].astype(np.float32), format="flt", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = s
            for pkt in aout.encode(frame):
                m4a.mux(pkt)
        for pkt in aout.encode(None):
            m4a.mux(pkt)


def flv_truncated(path: Path) -> bool:
    """True when an FLV ends inside a tag (the writer died mid-file): walks the 11-byte tag headers only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            if len(head) < 9 or head[:3] != b"FLV":
                return False
            pos = int.from_bytes(head[5:9], "big") + 4  # header, then PreviousTagSize0
            while pos < size:
                f.seek(pos)
                tag = f.read(11)
                if len(tag) < 11:
                    return True
                pos += 11 + int.from_bytes(tag[1:4], "big") + 4
            return pos > size
    except OSError:
        return False


def wav_stated_seconds(path: Path) -> float | None:
    """The length a RIFF/WAVE header promises (data chunk size / byte rate), or None when it does not say (a
    streaming writer's 0 or 0xFFFFFFFF, RF64, not a WAV). Walks the chunk headers only."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            byte_rate = None
            while True:
                ch = f.read(8)
                if len(ch) < 8:
                    return None
                cid, size = ch[:4], int.from_bytes(ch[4:8], "little")
                if cid == b"fmt ":
                    fmt = f.read(size)
                    byte_rate = int.from_bytes(fmt[8:12], "little") if len(fmt) >= 12 else None
                    size -= len(fmt)
                elif cid == b"data":
                    if not byte_rate or size in (0, 0xFFFFFFFF):
                        return None
                    return size / byte_rate
                f.seek(size + (size & 1), 1)
    except OSError:
        return None


def completeness_notes(path: Path, decoded_s: float, stated_s: float | None = None) -> list[str]:
    """Say so when a recording was cut short (crashed OBS): FLV ending mid-tag, or less audio than the header says.
    stated_s: the container's duration when the caller has it open (None: probed here)."""
    notes = []
    wav = wav_stated_seconds(path) if path.suffix.lower() in (".wav", ".wave") else None
    if path.suffix.lower() == ".flv" and flv_truncated(path):
        notes.append(f"recording is truncated (the file ends mid-packet); processed the {decoded_s:.1f} s "
                     "that could be decoded")
    elif wav is not None and wav > decoded_s + WAV_SHORT_S:
        notes.append(f"recording is truncated: its header says {wav:.1f} s, {decoded_s:.1f} s are present and "
                     "were processed")
    else:
        stated = stated_s
        if stated is None:
            try:
                stated = probe(path, shown_size=False).duration
            except Exception:  # noqa: BLE001 - only a hint; decoding already succeeded
                stated = 0.0
        if stated > decoded_s + max(1.0, 0.05 * stated):
            notes.append(f"recording looks truncated: its header says {stated:.1f} s, {decoded_s:.1f} s of audio "
                         "could be decoded and were processed")
    return notes
