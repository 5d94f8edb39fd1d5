"""Frames as players show them. Decoders hand out frames as stored; two things players apply are applied here, once
per stream, to every frame a template, thumbnail or training clip is made of:
  - the display matrix: phones store a portrait video as landscape frames and a matrix that turns them upright;
  - HDR: an HLG or PQ frame (phones record HDR by default) is made SDR BT.709, as every output is (hdr.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from heygem_watch import hdr

# A display matrix (ISO/IEC 14496-12 tkhd; FFmpeg's DISPLAYMATRIX side data) holds 16.16 fixed-point numbers
MATRIX_ONE = 1 << 16
# What turns a decoded picture upright: (transpose, flip rows, flip columns), applied in that order
Orientation = tuple[bool, bool, bool]
UPRIGHT: Orientation = (False, False, False)
_TURNS = {(False, True, True): "turned 180°", (False, False, True): "mirrored", (False, True, False): "flipped",
          (True, True, False): "turned 90° counter-clockwise", (True, False, True): "turned 90° clockwise",
          (True, False, False): "turned 90° and mirrored", (True, True, True): "turned 90° and mirrored"}


def frame_orientation(frame) -> tuple[Orientation, str | None]:
    """What turns a decoded frame upright, as its display matrix asks, and a note for the operator (None when the
    frame is stored upright).

    Phones store a portrait video as landscape frames plus a matrix that players apply; decoders hand out the
    stored frames. A matrix that is not a quarter turn or a mirror (a free angle, a scale) is left alone: UPRIGHT
    and a note that says so."""
    box = frame.side_data
    for entry in box:  # PyAV 18.1.0 gives the entries, 18.1.1 on their types (keys of a mapping)
        sd = entry if hasattr(entry, "type") else box[entry]
        if getattr(sd.type, "name", "") != "DISPLAYMATRIX":
            continue
        m = np.frombuffer(bytes(sd), np.int32, count=9)  # a b u / c d v / x y w, native byte order
        a, b, c, d = (int(v) for v in (m[0], m[1], m[3], m[4]))
        # the picture's point (p, q) (column, row) is shown at (a p + c q, b p + d q), up to a shift
        if b == c == 0 and abs(a) == abs(d) == MATRIX_ONE:
            o: Orientation = (False, d < 0, a < 0)
        elif a == d == 0 and abs(b) == abs(c) == MATRIX_ONE:
            o = (True, b < 0, c < 0)
        else:
            return UPRIGHT, (f"display matrix (a b c d) = ({a} {b} {c} {d}) / {MATRIX_ONE} is not a quarter turn or "
                             "a mirror: frames used as stored")
        if o == UPRIGHT:
            return UPRIGHT, None
        return o, f"stored {frame.width}x{frame.height}, {_TURNS[o]} on display: used upright as players show it"
    return UPRIGHT, None


def upright(img: np.ndarray, o: Orientation) -> np.ndarray:
    """An (H, W) or (H, W, C) picture turned upright as `o` says (img itself when o is UPRIGHT)."""
    if o == UPRIGHT:
        return img
    import cv2

    transpose, rows, cols = o
    if transpose:
        img = cv2.transpose(img)
    if rows or cols:
        img = cv2.flip(img, -1 if rows and cols else 0 if rows else 1)
    return img


def pixel_aspect(stream) -> Fraction:
    """A video stream's pixel width over height (1 unless it says otherwise, or says something absurd)."""
    for sar in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if sar and 0.25 <= sar <= 4:
            return Fraction(sar.numerator, sar.denominator)
    return Fraction(1)


@dataclass(frozen=True)
class Colour:
    """How stored yuv420p bytes are read, in FFmpeg's numbers (AVColorSpace, AVColorPrimaries,
    AVColorTransferCharacteristic, AVColorRange); 2 (range: 0) is unspecified: players guess from the size. The
    writer tags each output with its template's (the output carries the template's bytes)."""
    matrix: int = 2
    primaries: int = 2
    trc: int = 2
    range: int = 0


# what a picture made through OpenCV's BGR -> I420 (BT.601, limited range) is: a still photo (sRGB) or an odd-sized
# video frame (which keeps its primaries and transfer)
BT601_MATRIX, BT709, SRGB_TRC, LIMITED, FULL = 6, 1, 13, 1, 2
STILL_COLOUR = Colour(BT601_MATRIX, BT709, SRGB_TRC, LIMITED)


@dataclass(frozen=True)
class Look:
    """How a stream's frames are shown: the turn that makes them upright, their HDR transfer ("HLG", "PQ"; None for
    SDR), their pixels' width over height, whether their Y'CbCr is full range, and what an operator should be told."""
    orientation: Orientation = UPRIGHT
    transfer: str | None = None
    notes: tuple[str, ...] = ()
    pixel_aspect: Fraction = Fraction(1)
    full_range: bool = False

    @property
    def as_stored(self) -> bool:
        """Nothing to do: a template's cache keeps the decoded bytes as they are (template_frames.decode)."""
        return (self.orientation == UPRIGHT and self.transfer is None and self.pixel_aspect == 1
                and not self.full_range)

    def shown_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) players show a stored width x height frame at: square pixels, turned upright."""
        wide = round(width * self.pixel_aspect)
        return (height, wide) if self.orientation[0] else (wide, height)


def look_of(frame, stream=None) -> Look:
    """The Look of a stream, from its first decoded frame (the matrix, the transfer and the range travel with every
    frame) and the stream (its pixel aspect; square without one)."""
    o, note = frame_orientation(frame)
    transfer = hdr.transfer_of(frame)
    notes = ([note] if note else []) + ([f"HDR ({transfer}) video: made SDR (BT.709) for the outputs"]
                                        if transfer else [])
    sar = pixel_aspect(stream) if stream is not None else Fraction(1)
    if round(frame.width * sar) != frame.width:  # non-square pixels (anamorphic video): made square
        notes.append(f"stored {frame.width}x{frame.height} with pixels {sar} as wide as high: "
                     f"shown {round(frame.width * sar)}x{frame.height}")
    return Look(o, transfer, tuple(notes), sar, full_range(frame))


def picture(frame, look: Look, fmt: str = "bgr24") -> np.ndarray:
    """A decoded frame as players show it, (H, W, C) in a packed format (bgr24, rgb24, gray)."""
    if look.transfer is None:
        return upright(frame.to_ndarray(format=fmt), look.orientation)
    import av

    sdr = av.VideoFrame.from_ndarray(hdr.to_sdr_rgb(frame, look.transfer), format="rgb24")
    return upright(sdr.to_ndarray(format=fmt), look.orientation)


def stored_colour(frame, look: Look) -> Colour:
    """The Colour of the yuv420p a template's cache stores for this stream (template_frames.decode)."""
    source = Colour(int(frame.colorspace or 2), int(frame.color_primaries or 2), int(frame.color_trc or 2),
                    int(frame.color_range or 0))
    if look.transfer is not None:  # made SDR: BT.709 primaries, gamma
        source = Colour(source.matrix, BT709, BT709, LIMITED)
    if frame.width % 2 or frame.height % 2:  # through BGR and OpenCV's BT.601
        return Colour(BT601_MATRIX, source.primaries, source.trc, LIMITED)
    if look.transfer is not None:  # in the matrix players assume for its size (hdr.to_sdr_yuv420p)
        return Colour(BT709 if hdr.is_hd(frame.width, frame.height) else BT601_MATRIX, BT709, BT709, LIMITED)
    if full_range(frame):  # made limited range (template_frames.yuv420p)
        return Colour(source.matrix, source.primaries, source.trc, LIMITED)
    return source


def full_range(frame) -> bool:
    """Whether a frame's Y'CbCr is full range (0-255): tagged so, or a yuvj format (full range by definition)."""
    return int(frame.color_range or 0) == FULL or frame.format.name.startswith("yuvj")
