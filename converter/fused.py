"""The row quantizer as one compiled pass (numba, when installed): the same bytes as
the torch path of `quantize.quantize_rows`, without its ten passes over each chunk.

Per group of 4 rows it widens the stored words to float32 bits, finds each row's bound
(`max|w|` on the bits: the order of |float| is the order of its bits without the sign),
divides, rounds half to even, sums and offsets each value, and writes the group's 4x4 tiles.
The loops are written so that LLVM vectorizes them (AVX2 here: the bound is a signed int32 max,
rounding adds and subtracts 1.5 * 2^23 with the offset folded in, levels are stored as bytes
from int32) and the tiles are assembled from 32-bit words with shifts and masks (little-endian).
The division is float32 (numba keeps float32 / float32 in float32; were it done in float64,
rounding that to float32 gives the same value, as 53 >= 2 * 24 + 2 bits), with no fast-math.
It releases the GIL, so chunks quantize in parallel threads.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

try:
    import numba
except ImportError:  # the torch path in quantize.py gives the same bytes
    numba = None  # type: ignore[assignment]

SIGN_OFF = np.uint32(0x7FFFFFFF)
NON_FINITE = np.int32(0x7F800000)  # |bits| at or above: Inf or NaN
ROUND = np.float32(1.5 * 2**23)  # (x + ROUND) - ROUND is x rounded half to even, for |x| < 2^22
LOW_BYTES, HIGH_BYTES = np.uint32(0x00FF00FF), np.uint32(0xFF00FF00)
LOW_HALF, HIGH_HALF = np.uint32(0xFFFF), np.uint32(0xFFFF0000)
NIBBLES = np.uint32(0x0F0F0F0F)


def _quantize_rows(words: np.ndarray, bits: int, out: np.ndarray, scale_out: np.ndarray, sum_out: np.ndarray,
                   line: np.ndarray, bound_bits: np.ndarray, levels: np.ndarray) -> None:
    """Quantize rows of `words` (bf16 as uint16 `[R, I]`, or float32 as uint32 `[R, I]`) into the
    tile4 words `out` (uint32 `[I/4, R*bits/8]`), `scale_out` `[R]` (NaN for a row holding NaN or
    Inf) and `sum_out` `[R]`; `line` (uint32 `[I]`), `bound_bits` (uint32 `[1]`) and `levels`
    (uint8 `[4, I]`) are work buffers."""
    rows = scale_out.shape[0]
    cols = line.shape[0]
    shift = 16 if words.itemsize == 2 else 0
    limit = np.float32(2 ** (bits - 1) - 1)
    offset = np.int32(2 ** (bits - 1))
    shifted = ROUND + np.float32(offset)  # rounds and adds the offset at once (both exact)
    values = line.view(np.float32)
    bound = bound_bits.view(np.float32)
    quads = levels.view(np.uint32)  # [4, I/4]: 4 levels of a row in each word
    for group in range(rows // 4):
        for k in range(4):
            row = group * 4 + k
            top = np.int32(0)
            for i in range(cols):
                x = np.uint32(words[row, i]) << shift
                line[i] = x
                magnitude = np.int32(x & SIGN_OFF)
                top = magnitude if magnitude > top else top
            level = levels[k]
            if top >= NON_FINITE:
                scale_out[row] = np.nan
                sum_out[row] = 0
                level[:] = offset
                continue
            bound_bits[0] = np.uint32(top)
            scale = bound[0] / limit
            if scale == 0:
                scale = np.float32(1)
            scale_out[row] = scale
            total = np.int32(0)
            for i in range(cols):
                unsigned = np.int32((values[i] / scale + shifted) - ROUND)
                total += unsigned
                level[i] = np.uint8(unsigned)
            sum_out[row] = total - offset * cols
        if bits == 8:  # 4x4 byte transposes: word j of tile i4 gets byte j of rows 0..3 (`quads[k, i4]`)
            base = group * 4
            for i4 in range(cols // 4):
                w0, w1, w2, w3 = quads[0, i4], quads[1, i4], quads[2, i4], quads[3, i4]
                even01 = (w0 & LOW_BYTES) | ((w1 & LOW_BYTES) << np.uint32(8))  # bytes 0 and 2 of rows 0, 1
                odd01 = ((w0 >> np.uint32(8)) & LOW_BYTES) | (w1 & HIGH_BYTES)  # bytes 1 and 3
                even23 = (w2 & LOW_BYTES) | ((w3 & LOW_BYTES) << np.uint32(8))
                odd23 = ((w2 >> np.uint32(8)) & LOW_BYTES) | (w3 & HIGH_BYTES)
                out[i4, base] = (even01 & LOW_HALF) | (even23 << np.uint32(16))
                out[i4, base + 1] = (odd01 & LOW_HALF) | (odd23 << np.uint32(16))
                out[i4, base + 2] = (even01 >> np.uint32(16)) | (even23 & HIGH_HALF)
                out[i4, base + 3] = (odd01 >> np.uint32(16)) | (odd23 & HIGH_HALF)
        else:  # int4: byte `j*2 + h` of tile i4 is rows 2h (low nibble) and 2h+1 (high) at column j
            base = group * 2
            for i4 in range(cols // 4):
                pair0 = (quads[0, i4] & NIBBLES) | ((quads[1, i4] & NIBBLES) << np.uint32(4))
                pair1 = (quads[2, i4] & NIBBLES) | ((quads[3, i4] & NIBBLES) << np.uint32(4))
                even = (pair0 & LOW_BYTES) | ((pair1 & LOW_BYTES) << np.uint32(8))  # columns 0 and 2
                odd = ((pair0 >> np.uint32(8)) & LOW_BYTES) | (pair1 & HIGH_BYTES)  # columns 1 and 3
                out[i4, base] = (even & LOW_HALF) | (odd << np.uint32(16))
                out[i4, base + 1] = (even >> np.uint32(16)) | (odd & HIGH_HALF)


Kernel = Callable[..., None]


def _compiled() -> Kernel | None:
    if numba is None:
        return None
    try:
        return numba.njit(nogil=True, cache=True)(_quantize_rows)
    except RuntimeError:  # no writable cache folder: compiled again in each process
        return numba.njit(nogil=True)(_quantize_rows)


kernel = _compiled()
