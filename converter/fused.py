"""The row quantizer as one compiled pass (numba, when installed): the same bytes as
`quantize.RowQuantizer`'s torch path, without its ten passes over each chunk.

Per group of 4 rows it widens the stored words to float32 bits, finds each row's bound
(`max|w|` on the bits: the order of |float| is the order of its bits without the sign),
divides, rounds half to even, sums and offsets each value, and writes the group's 4x4 tiles.
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
NON_FINITE = np.uint32(0x7F800000)  # |bits| at or above: Inf or NaN


def _quantize_rows(words: np.ndarray, wide: bool, bits: int, out: np.ndarray, scale_out: np.ndarray,
                   sum_out: np.ndarray, widened: np.ndarray, bound_bits: np.ndarray, levels: np.ndarray) -> None:
    """Quantize rows of `words` (bf16 as uint16 `[R, I]`, or float32 as uint16 `[R, 2I]` when `wide`)
    into the tile4 bytes `out` `[I/4, R*bits/2]`, `scale_out` `[R]` (NaN for a row holding NaN or
    Inf) and `sum_out` `[R]`; `widened` (uint32 `[4, I]`), `bound_bits` (uint32 `[1]`) and `levels`
    (uint8 `[4, I]`) are work buffers."""
    rows = scale_out.shape[0]
    cols = widened.shape[1]
    limit = np.float32(2 ** (bits - 1) - 1)
    offset = 2 ** (bits - 1)
    values = widened.view(np.float32)
    bound = bound_bits.view(np.float32)
    for group in range(rows // 4):
        for k in range(4):
            row = group * 4 + k
            line = widened[k]
            if wide:
                for i in range(cols):
                    line[i] = np.uint32(words[row, 2 * i]) | (np.uint32(words[row, 2 * i + 1]) << 16)
            else:
                for i in range(cols):
                    line[i] = np.uint32(words[row, i]) << 16
            top = np.uint32(0)
            for i in range(cols):
                top = max(top, line[i] & SIGN_OFF)
            level = levels[k]
            if top >= NON_FINITE:
                scale_out[row] = np.nan
                sum_out[row] = 0
                level[:] = offset
                continue
            bound_bits[0] = top
            scale = bound[0] / limit
            if scale == 0:
                scale = np.float32(1)
            scale_out[row] = scale
            total = 0
            value = values[k]
            for i in range(cols):
                q = np.int32(np.rint(value[i] / scale))
                total += q
                level[i] = np.uint8(q + offset)
            sum_out[row] = total
        if bits == 8:
            base = group * 16
            for i4 in range(cols // 4):
                for j in range(4):
                    for k in range(4):
                        out[i4, base + j * 4 + k] = levels[k, i4 * 4 + j]
        else:
            base = group * 8
            for i4 in range(cols // 4):
                for j in range(4):
                    for h in range(2):
                        out[i4, base + j * 2 + h] = levels[2 * h, i4 * 4 + j] | (levels[2 * h + 1, i4 * 4 + j] << 4)


Kernel = Callable[..., None]


def _compiled() -> Kernel | None:
    if numba is None:
        return None
    try:
        return numba.njit(nogil=True, cache=True)(_quantize_rows)
    except RuntimeError:  # no writable cache folder: compiled again in each process
        return numba.njit(nogil=True)(_quantize_rows)


kernel = _compiled()
