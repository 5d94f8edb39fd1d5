"""CTranslate2's model.bin read and rewritten in memory, to load only what the speech front end uses.

    model = read_model(data)                      variables in file order, their bytes not copied
    data = write_model(model)                     the same layout back: write_model(read_model(d)) == d
    files = encoder_only(files, layers=3)         the Whisper model cut to encoder blocks 0-2 (and a stub decoder)

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
from dataclasses import dataclass, replace

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


class _Reader:
    def __init__(self, data: bytes):
        self.view, self.pos = memoryview(data), 0

    def take(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.view, self.pos)
        except struct.error:
            raise ModelFileError(f"model.bin ends early (at byte {self.pos})") from None
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("H")
        raw = self.take_bytes(n)
        return bytes(raw[:-1]).decode("utf-8")

    def take_bytes(self, n: int) -> memoryview:
        if self.pos + n > len(self.view):
            raise ModelFileError(f"model.bin ends early (a block of {n} bytes at byte {self.pos})")
        out = self.view[self.pos: self.pos + n]
        self.pos += n
        return out


def read_model(data: bytes) -> Model:
    """Parse model.bin (the variables' bytes are views into data)."""
    r = _Reader(data)
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
        variables.append(Variable(name, shape, dtype, r.take_bytes(nbytes)))
    aliases = tuple((r.string(), r.string()) for _ in range(r.take("I")))
    if r.pos != len(data):
        raise ModelFileError(f"model.bin has {len(data) - r.pos} unexpected bytes after its last alias")
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


def _stub_decoder(v: Variable) -> Variable | None:
    """What the encoder-only model keeps of a variable (None: dropped)."""
    if v.name.startswith("decoder/layer_") and not v.name.startswith("decoder/layer_0/"):
        return None
    if v.name == EMBEDDING:
        row = len(v.data) // v.shape[0]
        return replace(v, shape=(STUB_TOKENS, *v.shape[1:]), data=v.data[: STUB_TOKENS * row])
    return v


def _encoder_block(name: str) -> int | None:
    if not name.startswith("encoder/layer_"):
        return None
    number = name[len("encoder/layer_"):].split("/", 1)[0]
    return int(number) if number.isdigit() else None  # encoder/layer_norm is not a block


def encoder_only(files: dict[str, bytes], layers: int | None = None) -> dict[str, bytes]:
    """{file: bytes} of a Whisper model for CTranslate2 -> the same model with a stub decoder (see module doc) and,
    given `layers`, only encoder blocks 0 .. layers - 1."""
    model = read_model(files["model.bin"])
    if not any(v.name == EMBEDDING for v in model.variables):
        raise ModelFileError(f"model.bin ({model.spec}) has no {EMBEDDING}: not a Whisper model")
    blocks = {b for b in map(_encoder_block, (v.name for v in model.variables)) if b is not None}
    if layers is not None and not 1 <= layers <= len(blocks):
        raise ModelFileError(f"model.bin has {len(blocks)} encoder layers, cannot keep {layers}")
    shallow = [v for v in model.variables if layers is None or (_encoder_block(v.name) or 0) < layers]
    kept = tuple(k for k in map(_stub_decoder, shallow) if k is not None)
    out = dict(files)
    out["model.bin"] = write_model(replace(model, variables=kept))
    tokens = files["vocabulary.txt"].decode("utf-8").splitlines()[:STUB_TOKENS]
    out["vocabulary.txt"] = ("\n".join(tokens) + "\n").encode("utf-8")
    return out
