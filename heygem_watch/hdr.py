"""HDR templates made SDR, once, when a template is decoded into its cache (template_frames.decode).

Phones record HDR by default (an iPhone: HEVC 10-bit, BT.2020 primaries, HLG transfer); every output is 8-bit SDR
H.264, which players show as BT.709. Taken as they are, HLG frames play dim and washed out and PQ frames dark and
flat. A frame whose transfer is HLG or PQ therefore goes:

  10-bit Y'CbCr -> R'G'B' (its matrix, swscale) -> display light in units of the HDR reference white (203 cd/m2,
  ITU-R BT.2408; HLG through its OOTF for a 1000 cd/m2 display, ITU-R BT.2100) -> BT.709 primaries -> highlights
  above KNEE rolled off below SDR white, everything under it kept -> BT.1886 (gamma 2.4) -> 8-bit Y'CbCr 4:2:0,
  limited range, in the matrix players assume for an untagged video of that size (BT.709 for HD) (swscale).

HDR reference white becomes SDR white: skin, clothes and walls keep the brightness they were mastered at.
"""
from __future__ import annotations

import functools

import numpy as np

TRC_PQ = 16  # AVColorTransferCharacteristic: SMPTE ST 2084
TRC_HLG = 18  # ARIB STD-B67
SPACE_BT2020 = (9, 10)  # AVColorSpace: BT.2020 non-constant and constant luminance (the latter read as the former)
REF_WHITE_NITS = 203.0  # ITU-R BT.2408: HDR reference white (graphics white, a white shirt)
HLG_PEAK_NITS = 1000.0  # the nominal display the HLG OOTF is evaluated for
HLG_GAMMA = 1.2  # the OOTF's system gamma at 1000 cd/m2
HLG_A, HLG_B, HLG_C = 0.17883277, 0.28466892, 0.55991073
PQ_M1, PQ_M2 = 2610 / 16384, 2523 / 4096 * 128
PQ_C1, PQ_C2, PQ_C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
PQ_PEAK_NITS = 10000.0
KNEE = 0.75  # in units of SDR white: below it the picture is kept, above it highlights are rolled off
SDR_GAMMA = 2.4  # BT.1886
BT2020_LUMA = (0.2627, 0.6780, 0.0593)  # luminance of linear BT.2020 RGB (ITU-R BT.2100)
# CIE 1931 xy of the red, green, blue primaries and the D65 white point
BT709_PRIMARIES = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))
BT2020_PRIMARIES = ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046))
D65 = (0.3127, 0.3290)
CODES = 1 << 16  # rgb48le code values: the lookup table from code to light has one entry each
OUT_STEPS = 4096  # the gamma is applied through a table of this many steps (finer than 8-bit output)


def transfer_of(frame) -> str | None:
    """"HLG" or "PQ" when the frame's transfer is HDR, else None (SDR, 8- or 10-bit, is used as it is)."""
    return {TRC_HLG: "HLG", TRC_PQ: "PQ"}.get(int(frame.color_trc or 0))


def rgb_to_xyz(primaries, white=D65) -> np.ndarray:
    """3x3 matrix from linear RGB with these primaries to CIE XYZ (Y = 1 for RGB = 1, 1, 1)."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T
    wx, wy = white
    scale = np.linalg.solve(xyz, np.array([wx / wy, 1.0, (1 - wx - wy) / wy]))
    return xyz * scale


@functools.cache
def bt2020_to_bt709() -> np.ndarray:
    """3x3 matrix taking linear BT.2020 RGB to linear BT.709 RGB (ITU-R BT.2087 gives the inverse); read-only, as
    every call returns the same array."""
    m = np.linalg.solve(rgb_to_xyz(BT709_PRIMARIES), rgb_to_xyz(BT2020_PRIMARIES))
    m.flags.writeable = False
    return m


def hlg_inverse_oetf(e: np.ndarray) -> np.ndarray:
    """HLG signal E' (0..1) -> normalised scene light E (0..1), ITU-R BT.2100."""
    e = np.asarray(e, np.float64)
    low = e * e / 3.0
    high = (np.exp((e - HLG_C) / HLG_A) + HLG_B) / 12.0
    return np.where(e <= 0.5, low, high)


def pq_eotf(e: np.ndarray) -> np.ndarray:
    """PQ signal E' (0..1) -> display light in cd/m2, SMPTE ST 2084."""
    p = np.power(np.clip(np.asarray(e, np.float64), 0, 1), 1 / PQ_M2)
    return PQ_PEAK_NITS * np.power(np.maximum(p - PQ_C1, 0) / (PQ_C2 - PQ_C3 * p), 1 / PQ_M1)


def roll_off(x: np.ndarray) -> np.ndarray:
    """Tone curve on light in units of SDR white: x itself up to KNEE, then an exponential shoulder that meets it
    with the same slope and approaches 1 (SDR white) without reaching it."""
    span = 1.0 - KNEE
    return np.where(x <= KNEE, x, KNEE + span * (1 - np.exp(-(x - KNEE) / span)))


@functools.cache
def _light_table(transfer: str) -> np.ndarray:
    """(CODES,) float32: rgb48le code -> HLG scene light E (0..1, the OOTF needs all three channels) or PQ display
    light in units of reference white."""
    e = np.arange(CODES) / (CODES - 1)
    if transfer == "HLG":
        return hlg_inverse_oetf(e).astype(np.float32)
    return (pq_eotf(e) / REF_WHITE_NITS).astype(np.float32)



def to_sdr_rgb(frame, transfer: str) -> np.ndarray:
    """An HDR frame as (H, W, 3) uint8 RGB, SDR BT.709 (gamma 2.4), full range."""
    from av.video.reformatter import ColorRange, Colorspace

    space = Colorspace.BT2020 if int(frame.colorspace or 0) in SPACE_BT2020 else Colorspace.ITU709
    from heygem_watch.display import full_range  # (display imports this module)

    rgb16 = frame.reformat(format="rgb48le", src_colorspace=space,
                           src_color_range=ColorRange.JPEG if full_range(frame) else ColorRange.MPEG).to_ndarray()
    table = _light_table(transfer)
    out = np.empty(rgb16.shape, np.uint8)
    # two bands of rows on two threads: numpy and OpenCV let go of the GIL for arrays this large
    half = rgb16.shape[0] // 2
    list(_pool().map(lambda rows: _to_sdr(rgb16[rows], table, transfer, out[rows]),
                     (slice(0, half), slice(half, None))))
    return out


def _to_sdr(rgb16: np.ndarray, table: np.ndarray, transfer: str, out: np.ndarray) -> None:
    """rgb48le codes (h, w, 3) -> 8-bit SDR RGB into out (the stages of the module docstring after swscale's)."""
    import cv2

    light = table[rgb16]  # (h, w, 3) float32
    if transfer == "HLG":  # OOTF: display light = peak * Ys^(gamma - 1) * E, Ys the scene luminance
        ys = np.maximum(cv2.transform(light, np.float32([BT2020_LUMA])), 1e-6)  # (h, w)
        _scale(light, (HLG_PEAK_NITS / REF_WHITE_NITS) * cv2.pow(ys, HLG_GAMMA - 1))
    light = cv2.transform(light, bt2020_to_bt709().astype(np.float32))  # (a cached 3x3)
    np.maximum(light, 0, out=light)  # colours outside BT.709 lose what it cannot show
    # the brightest channel is rolled off and the other two scaled with it (hue kept)
    r, g, b = cv2.split(light)
    peak = cv2.max(cv2.max(r, g), b)
    bright = peak > KNEE
    if bright.any():
        _scale(light, np.where(bright, roll_off(peak) / np.maximum(peak, 1e-6), 1.0).astype(np.float32))
    light *= OUT_STEPS - 1
    light += 0.5
    np.minimum(light, OUT_STEPS - 1, out=light)
    out[...] = _gamma_table()[light.astype(np.uint16)]


@functools.cache
def _pool():
    """The two threads to_sdr_rgb's bands run on (made on first use, kept: HDR templates are decoded in a row)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(2, thread_name_prefix="hdr")


def _scale(rgb: np.ndarray, factor: np.ndarray) -> None:
    """rgb (H, W, 3) float32 *= factor (H, W), in place (numpy's broadcast over a last axis of 3 is slow)."""
    import cv2

    cv2.multiply(rgb, cv2.merge((factor, factor, factor)), dst=rgb)


@functools.cache
def _gamma_table() -> np.ndarray:
    """(OUT_STEPS,) uint8: linear light 0..1 (in OUT_STEPS steps) -> 8-bit BT.1886 code, full range."""
    return np.round(255 * np.power(np.arange(OUT_STEPS) / (OUT_STEPS - 1), 1 / SDR_GAMMA)).astype(np.uint8)


def is_hd(width: int, height: int) -> bool:
    """Whether players take an untagged video of this size for BT.709 (else BT.601), as mpv and FFmpeg's tools do."""
    return width >= 1280 or height > 576


def to_sdr_yuv420p(frame, transfer: str) -> np.ndarray:
    """An HDR frame as the cache stores frames: yuv420p (H * 3 / 2, W) uint8, limited range, in the matrix players
    assume for an untagged video of its size (BT.709 when is_hd, else BT.601); outputs are tagged with it too
    (display.stored_colour)."""
    import av
    from av.video.reformatter import ColorRange, Colorspace

    hd = is_hd(frame.width, frame.height)
    out = av.VideoFrame.from_ndarray(to_sdr_rgb(frame, transfer), format="rgb24")
    return out.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709 if hd else Colorspace.ITU601,
                        dst_color_range=ColorRange.MPEG).to_ndarray()
