"""Files for the dashboard: confinement of every path to var/ and the template folder, name sanitising, atomic
uploads, thumbnails (a frame from the middle, JPEG), media facts, and the streamed ZIP.

Nothing here trusts a name from the client: names are reduced to one plain path component, and every path that
is read or written is resolved (symlinks followed) and must land inside one of the allowed roots.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import unicodedata
import uuid
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from heygem_watch.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

PARTIAL_PREFIX = ".partial-"  # dot-files: the watcher and the template listing skip them
COPY_CHUNK = 1 << 20  # bytes per read/write when copying uploads and streaming ZIPs
NAME_MAX_BYTES = 180  # UTF-8 bytes kept of a file name's stem (ext4 allows 255 for the whole name)
THUMB_WIDTH = 320  # pixels; thumbnails keep the aspect ratio
THUMB_QUALITY = 80  # JPEG quality
TEMPLATE_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')  # separators, control and shell/Windows-hostile characters


class WebError(Exception):
    """A refusal the API turns into an HTTP error: status code and a message for people."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


def sanitize_name(name: str, default: str = "upload") -> str:
    """A client file name -> one safe path component. Keeps letters of any script (Chinese stays readable),
    drops directories, separators, control characters and leading dots; '..' can never survive."""
    name = unicodedata.normalize("NFC", str(name or ""))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]  # browsers on Windows may send C:\\dir\\file
    name = _UNSAFE.sub("_", name).strip().lstrip(".").strip()
    name = re.sub(r"\.{2,}", ".", name)
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    stem = stem.strip(" ._") or default
    while len(stem.encode("utf-8")) > NAME_MAX_BYTES:
        stem = stem[:-1]
    ext = re.sub(r"[^A-Za-z0-9]", "", ext)[:8].lower()
    return f"{stem}.{ext}" if ext else stem


def within(path: Path, roots: Iterable[Path]) -> Path:
    """path resolved (symlinks followed); WebError 403 unless it lies inside one of roots (also resolved)."""
    real = Path(os.path.realpath(path))
    for root in roots:
        r = Path(os.path.realpath(root))
        if real == r or r in real.parents:
            return real
    raise WebError(403, "path outside the allowed folders")


def child(root: Path, name: str) -> Path:
    """root/name for a name that must be one plain component (no '/', '\\', '..', absolute or empty)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or os.path.isabs(name):
        raise WebError(400, f"invalid name {name!r}")
    return within(root / name, [root])


def save_stream(src: BinaryIO, dest_dir: Path, suffix: str, max_bytes: int) -> Path:
    """Copy an upload into dest_dir under a hidden temporary name; WebError 413 past max_bytes (the partial is
    removed). The suffix is kept so content checks that look at it (images) work on the partial."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}{suffix}"
    size = 0
    try:
        with open(tmp, "wb") as out:
            while True:
                chunk = src.read(COPY_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise WebError(413, f"file is larger than the limit of {max_bytes // (1 << 20)} MB")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if size == 0:
        tmp.unlink(missing_ok=True)
        raise WebError(400, "file is empty (0 bytes)")
    return tmp


def sweep_partials(dirs: Iterable[Path], older_than_s: float = 3600) -> int:
    """Remove upload partials a killed web process left behind (at start-up; none of ours is that old)."""
    import time

    n, cutoff = 0, time.time() - older_than_s
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.rglob(f"{PARTIAL_PREFIX}*"):
            try:
                if p.is_file() and p.stat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
            except OSError:
                pass
    return n


def commit(partial: Path, dest_dir: Path, name: str) -> Path:
    """Atomically give a finished partial its final name in dest_dir, never replacing a file: 'a.mp4' becomes
    'a-2.mp4' when taken. os.link fails if the target exists, so two commits cannot pick the same name."""
    stem, ext = os.path.splitext(name)
    for i in range(1, 1000):
        final = dest_dir / (name if i == 1 else f"{stem}-{i}{ext}")
        try:
            os.link(partial, final)
        except FileExistsError:
            continue
        partial.unlink(missing_ok=True)
        return final
    raise WebError(409, f"too many files named like {name}")


def file_key(path: Path) -> str:
    """Cheap identity of a file's current version: resolved path, size and mtime."""
    st = path.stat()
    return hashlib.blake2b(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=12).hexdigest()


_FP_CACHE: dict[str, str] = {}
_FACTS_CACHE: dict[str, dict] = {}
CACHE_MAX = 20_000  # memo entries (one per file version) before the memo starts over
_THUMB_LOCK = threading.Lock()


def content_fingerprint(path: Path) -> str:
    """The template/recording content fingerprint (blake2b), memoised per file version."""
    from heygem_watch.ledger import fingerprint_file

    key = file_key(path)
    if key not in _FP_CACHE:
        if len(_FP_CACHE) > CACHE_MAX:
            _FP_CACHE.clear()
        _FP_CACHE[key] = fingerprint_file(path)
    return _FP_CACHE[key]


def media_facts(path: Path) -> dict:
    """{duration_s, width, height, fps, has_video, has_audio} via probe, memoised per file version; {error} if bad."""
    from heygem_watch.media import MediaError, probe

    key = file_key(path)
    if key not in _FACTS_CACHE:
        if len(_FACTS_CACHE) > CACHE_MAX:
            _FACTS_CACHE.clear()
        try:
            info = probe(path)
            _FACTS_CACHE[key] = {"duration_s": round(info.duration, 3), "width": info.width, "height": info.height,
                                 "fps": round(float(info.fps), 3) if info.fps else None,
                                 "has_video": info.has_video, "has_audio": info.has_audio, "is_image": info.is_image}
        except MediaError as exc:
            return {"error": exc.reason}
    return _FACTS_CACHE[key]


def thumbnail(path: Path, cache_dir: Path) -> Path | None:
    """JPEG of the frame in the middle of a video (or the image itself), THUMB_WIDTH wide, cached under cache_dir
    by file version. None for audio-only or undecodable files."""
    out = cache_dir / f"{file_key(path)}.jpg"
    if out.exists():
        return out
    with _THUMB_LOCK:  # decoding is CPU work: one at a time, the daemon needs the cores
        if out.exists():
            return out
        bgr = _middle_frame(path)
        if bgr is None:
            return None
        import cv2

        h, w = bgr.shape[:2]
        if w > THUMB_WIDTH:
            bgr = cv2.resize(bgr, (THUMB_WIDTH, max(2, round(h * THUMB_WIDTH / w))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
        if not ok:
            return None
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}.jpg"
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, out)
        return out


def _middle_frame(path: Path):
    import av
    import cv2

    from heygem_watch import display

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return cv2.imread(str(path), cv2.IMREAD_COLOR)
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            if not c.streams.video:
                return None
            vs = c.streams.video[0]
            if c.duration and c.duration > 0:
                c.seek(int(c.duration // 2), any_frame=False)  # lands on the keyframe before the middle
            for frame in c.decode(vs):
                return display.picture(frame, display.look_of(frame))
            return None
    except (av.error.FFmpegError, OSError, ValueError):
        return None


class _Sink:
    """Write-only, non-seekable file object: zipfile writes into it, the generator drains it."""

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0

    def write(self, b) -> int:
        self.buf += b
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


def zip_stream(entries: list[tuple[Path, str]]) -> Iterator[bytes]:
    """A ZIP of (file, name in archive) produced chunk by chunk (never the whole archive in memory). Entries are
    stored, not deflated: MP4 is already compressed."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for src, arcname in entries:
            info = zipfile.ZipInfo.from_file(src, arcname)
            info.compress_type = zipfile.ZIP_STORED
            with open(src, "rb") as f, zf.open(info, "w", force_zip64=True) as dst:
                while True:
                    chunk = f.read(COPY_CHUNK)
                    if not chunk:
                        break
                    dst.write(chunk)
                    if len(sink.buf) >= COPY_CHUNK:
                        yield sink.drain()
            yield sink.drain()
    yield sink.drain()


def tail_lines(path: Path, max_lines: int = 200, max_bytes: int = 256 * 1024) -> list[str]:
    """The last lines of a text file (a per-recording JSONL log), reading at most max_bytes from the end."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read().decode("utf-8", errors="replace")
    return data.splitlines()[-max_lines:]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
