"""CTranslate2's model.bin read and rewritten in memory, to load only what the speech front end uses.

    model = read_model(data)                      variables in file order, their bytes not copied
    data = write_model(model)                     the same layout back: write_model(read_model(d)) == d
    files = encoder_only(files, layers=3)         the Whisper model cut to encoder blocks 0-2 (and a stub decoder)
    data = encoder_only_stream(FileSource(paths, on_bytes), layers=3)
                                                  the same cut read from model.bin's parts on disk: every byte goes
                                                  through on_bytes (the caller's hash), only the kept ones stay in memory

The speech front end runs Whisper's encoder only, but CTranslate2 loads, converts (float16 -> int8) and keeps the
whole model: the decoder is 104 of its 145 MB and ~80 % of the load time. CTranslate2 builds a layer list from the
variables present (layer_0, layer_1, ... up to the first missing one) and needs one decoder layer and an embedding
table to build a Whisper model at all; so the stub keeps decoder layer 0 and the first STUB_TOKENS rows of the
embedding (with a vocabulary of as many tokens). The encoder's weights are untouched: its output is bit-identical
(tested). With `layers`, encoder blocks from that one on are dropped too (the same counting makes a shallower
encoder; its final layer norm stays and normalises the last block kept).

Layout (CTranslate2 binary version 6, little-endian): u32 version, str spec name, u32 revision, u32 count, then per
variable: str name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, bytes; then u32 count of aliases, each two
strs (alias, target). A str is u16 length (with its NUL), the UTF-8 bytes, NUL.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

SUPPORTED_VERSION = 6
STUB_TOKENS = 64  # embedding rows kept for the stub decoder (it never runs); the first ids are plain text tokens
EMBEDDING = "decoder/embeddings/weight"


class ModelFileError(ValueError):
    """model.bin is not a CTranslate2 model file this module can read."""


@dataclass(frozen=True)
class Variable:
    name: str
    shape: tuple[int, ...]
    dtype: int  # CTranslate2's type id
    data: memoryview


@dataclass(frozen=True)
class Model:
    version: int
    spec: str
    revision: int
    variables: tuple[Variable, ...]
    aliases: tuple[tuple[str, str], ...]


class _MemorySource:
    """model.bin in memory: blocks are views into it (nothing copied)."""

    def __init__(self, data):
        self.view, self.pos = memoryview(data), 0

    def take(self, n: int, keep: int) -> memoryview:
        if self.pos + n > len(self.view):
            raise ModelFileError(f"model.bin ends early (a block of {n} bytes at byte {self.pos})")
        out = self.view[self.pos: self.pos + keep]
        self.pos += n
        return out

    def left(self) -> int:
        return len(self.view) - self.pos


class FileSource:
    """model.bin as the concatenation of files (a model split over packages), read once from start to end. Every
    byte read is handed to on_bytes (a hash's update) before it is used; blocks that are not kept pass through one
    reusable buffer, so memory holds only what the caller keeps (a cut model: 31 of 145 MB for Whisper base)."""

    CHUNK = 1 << 20

    def __init__(self, paths, on_bytes):
        import os

        self._paths, self._on_bytes = list(paths), on_bytes
        self._size = sum(os.stat(p).st_size for p in self._paths)
        self._files = iter(self._paths)
        self._fh = None
        self._buf = memoryview(bytearray(self.CHUNK))
        self.pos = 0

    def _read_into(self, out: memoryview) -> None:
        got = 0
        while got < len(out):
            if self._fh is None:
                path = next(self._files, None)
                if path is None:
                    raise ModelFileError(f"model.bin ends early (at byte {self.pos + got})")
                self._fh = open(path, "rb")
            n = self._fh.readinto(out[got:])
            if not n:
                self._fh.close()
                self._fh = None
                continue
            self._on_bytes(out[got:got + n])
            got += n
        self.pos += got

    def take(self, n: int, keep: int) -> bytes | memoryview:
        if self.pos + n > self._size:  # checked first: a damaged length must not allocate gigabytes
            raise ModelFileError(f"model.bin ends early (a block of {n} bytes at byte {self.pos})")
        out = memoryview(bytearray(keep)) if keep > self.CHUNK else self._buf[:keep]
        self._read_into(out)
        kept = bytes(out) if keep <= self.CHUNK else out
        rest = n - keep
        while rest:
            k = min(rest, self.CHUNK)
            self._read_into(self._buf[:k])
            rest -= k
        return kept

    def left(self) -> int:
        return self._size - self.pos

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _Reader:
    def __init__(self, source):
        self.source = source

    def take(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        values = struct.unpack("<" + fmt, self.source.take(n, n))
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("H")
        return bytes(self.source.take(n, n)[:-1]).decode("utf-8")


# keep(name, shape) -> the shape to keep (the same, or fewer rows of the first axis) or None to drop the variable
Keep = Callable[[str, tuple[int, ...]], "tuple[int, ...] | None"]


def read_model(data, keep: Keep | None = None) -> Model:
    """Parse model.bin: bytes (the variables' bytes are views into them) or a FileSource (read to its end).
    keep: which variables (and how many of their leading rows) the model returned holds; all when None."""
    r = _Reader(_MemorySource(data) if not isinstance(data, FileSource) else data)
    version = r.take("I")
    if version != SUPPORTED_VERSION:
        raise ModelFileError(f"model.bin has CTranslate2 binary version {version}, this reader knows "
                             f"{SUPPORTED_VERSION}")
    spec, revision = r.string(), r.take("I")
    variables = []
    for _ in range(r.take("I")):
        name = r.string()
        rank = r.take("B")
        shape = tuple(r.take("I") for _ in range(rank))
        dtype, nbytes = r.take("B"), r.take("I")
        kept = shape if keep is None else keep(name, shape)
        n_kept = 0 if kept is None else nbytes if kept == shape else nbytes // max(1, shape[0]) * kept[0]
        block = r.source.take(nbytes, n_kept)
        if kept is not None:
            variables.append(Variable(name, kept, dtype, block))
    aliases = tuple((r.string(), r.string()) for _ in range(r.take("I")))
    if r.source.left():
        raise ModelFileError(f"model.bin has {r.source.left()} unexpected bytes after its last alias")
    return Model(version, spec, revision, tuple(variables), aliases)


def _string(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model(model: Model) -> bytes:
    parts = [struct.pack("<I", model.version), _string(model.spec), struct.pack("<II", model.revision,
                                                                                  len(model.variables))]
    for v in model.variables:
        parts += [_string(v.name), struct.pack("<B", len(v.shape)), struct.pack(f"<{len(v.shape)}I", *v.shape),
                  struct.pack("<BI", v.dtype, len(v.data)), v.data]
    parts.append(struct.pack("<I", len(model.aliases)))
    parts += [_string(a) + _string(b) for a, b in model.aliases]
    return b"".join(parts)


def _encoder_block(name: str) -> int | None:
    if not name.startswith("encoder/layer_"):
        return None
    number = name[len("encoder/layer_"):].split("/", 1)[0]
    return int(number) if number.isdigit() else None  # encoder/layer_norm is not a block


def _encoder_keep(layers: int | None, seen: set[str]) -> Keep:
    """What the encoder-only model keeps (see module doc); every name parsed is added to seen."""

    def keep(name: str, shape: tuple[int, ...]):
        seen.add(name)
        if name.startswith("decoder/layer_") and not name.startswith("decoder/layer_0/"):
            return None
        if layers is not None and (_encoder_block(name) or 0) >= layers:
            return None
        if name == EMBEDDING:
            return (STUB_TOKENS, *shape[1:])
        return shape

    return keep


def _cut(model: Model, seen: set[str], layers: int | None) -> bytes:
    if EMBEDDING not in seen:
        raise ModelFileError(f"model.bin ({model.spec}) has no {EMBEDDING}: not a Whisper model")
    blocks = {b for b in map(_encoder_block, seen) if b is not None}
    if layers is not None and not 1 <= layers <= len(blocks):
        raise ModelFileError(f"model.bin has {len(blocks)} encoder layers, cannot keep {layers}")
    return write_model(model)


def stub_vocabulary(vocabulary: bytes) -> bytes:
    """The stub decoder's vocabulary: the first STUB_TOKENS lines."""
    tokens = vocabulary.decode("utf-8").splitlines()[:STUB_TOKENS]
    return ("\n".join(tokens) + "\n").encode("utf-8")


def encoder_only(files: dict[str, bytes], layers: int | None = None) -> dict[str, bytes]:
    """{file: bytes} of a Whisper model for CTranslate2 -> the same model with a stub decoder (see module doc) and,
    given `layers`, only encoder blocks 0 .. layers - 1."""
    seen: set[str] = set()
    model = read_model(files["model.bin"], _encoder_keep(layers, seen))
    out = dict(files)
    out["model.bin"] = _cut(model, seen, layers)
    out["vocabulary.txt"] = stub_vocabulary(files["vocabulary.txt"])
    return out


def encoder_only_stream(source: FileSource, layers: int | None = None) -> bytes:
    """encoder_only's model.bin, read from a FileSource to its last byte (so a hash fed by it covers the whole file);
    only the kept variables are held in memory."""
    seen: set[str] = set()
    try:
        return _cut(read_model(source, _encoder_keep(layers, seen)), seen, layers)
    finally:
        source.close()
