"""Pure tensor encodings of the MediaPipe GPU weight format.

Weights arrive as `[out, in]` row chunks (Hugging Face `nn.Linear` layout). Quantization is
symmetric and per output row, computed exactly as MediaPipe did it: f32 `bound = max|w|`,
`scale = bound / qmax` (0 becomes 1), `q = clip(round_half_even(w / scale))`.
The GPU layout is `tile4`: element `W[o, i]` goes to flat index
`((i//4) * (O/4) + o//4) * 16 + (i%4) * 4 + o%4`, i.e. an `[I/4, O/4, 4, 4]` grid.
Because of that, the `R` rows of a chunk land in a `[I/4, 4*R]` column band of the tiled
tensor seen as `[I/4, 4*O]` elements, which is how the writer streams a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import fused

TILE = 4


@dataclass(frozen=True)
class QuantizedRows:
    """One chunk of rows, quantized and already in tiled byte layout."""

    tiled: torch.Tensor  # uint8 [I/4, R*4] (int8) or [I/4, R*2] (int4, two per byte)
    scale: torch.Tensor  # float32 [R]
    row_sum: torch.Tensor  # int32 [R]: sum of the signed quantized values of each row


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def tile(rows: torch.Tensor) -> torch.Tensor:
    """`[R, I]` -> `[I/4, R/4, 4, 4]` (contiguous): the tile4 layout of a row chunk."""
    r, i = rows.shape
    return rows.reshape(r // TILE, TILE, i // TILE, TILE).permute(2, 0, 3, 1).contiguous()


def untile(tiled: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `tile` on a whole tensor: flat tile4 data -> `[O, I]`."""
    grid = tiled.reshape(in_features // TILE, out_features // TILE, TILE, TILE)
    return grid.permute(1, 3, 0, 2).reshape(out_features, in_features)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pairs of uint4 (low 4 bits of each byte) along the last axis -> bytes, the even element low."""
    return (values[..., 0::2] & 0x0F) | (values[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes -> uint4 values (low nibble first), doubling the last axis."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_rows(chunk: torch.Tensor, bits: int, tiled_out: torch.Tensor, scale_out: torch.Tensor,
                  sum_out: torch.Tensor, compiled: bool = True) -> None:
    """Quantize `chunk` [R, I]; write `tiled_out` [I/4, R*bits/2] bytes, `scale_out` [R], `sum_out` [R].

    Per row: `bound = max|w|`, `scale = bound / qmax` (0 -> 1), `q = clip(round_half_even(w / scale))`,
    the sum of q, then `q + 2^(bits-1)` as unsigned bytes (two nibbles per byte for int4, low
    first) in tile4 order. One compiled pass (converter.fused) when numba is installed and
    `compiled`, else torch ops; both give the same bytes. A row holding NaN or Inf gets a NaN
    (or Inf) scale. Safe to call from several threads at once (it keeps no state).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if compiled and fused.kernel is not None:
        _quantize_compiled(chunk, bits, tiled_out, scale_out, sum_out)
    else:
        _quantize_torch(chunk, bits, tiled_out, scale_out, sum_out)


def _quantize_compiled(chunk: torch.Tensor, bits: int, tiled_out: torch.Tensor, scale_out: torch.Tensor,
                       sum_out: torch.Tensor) -> None:
    assert fused.kernel is not None
    # bf16 words widen by a shift; other dtypes go through float32 bits.
    words = chunk.contiguous().view(torch.uint16) if chunk.dtype == torch.bfloat16 else \
        chunk.to(torch.float32).contiguous().view(torch.int32)
    cols = chunk.shape[1]
    fused.kernel(words.numpy().view(np.uint16 if words.dtype == torch.uint16 else np.uint32), bits,
                 tiled_out.view(torch.int32).numpy().view(np.uint32), scale_out.numpy(), sum_out.numpy(),
                 np.empty(cols, np.uint32), np.empty(1, np.uint32), np.empty((TILE, cols), np.uint8))


def _quantize_torch(chunk: torch.Tensor, bits: int, tiled_out: torch.Tensor, scale_out: torch.Tensor,
                    sum_out: torch.Tensor) -> None:
    rows, cols = chunk.shape
    limit = qmax(bits)
    # max/min of bf16/fp16 values are exact, so the bound is found in the stored dtype.
    bound = torch.maximum(chunk.amax(dim=1), chunk.amin(dim=1).neg_()).to(torch.float32)
    scale = bound.div_(limit)
    scale.masked_fill_(scale == 0, 1.0)
    # w / scale in float32 (the stored values widen exactly); |w| <= bound keeps
    # |w / scale| <= qmax (+ rounding error < 0.5), so no clamp is needed.
    values = torch.div(chunk, scale[:, None]).round_()
    # Float row sums are exact while |sum| < 2^24; wider rows sum in int32 instead.
    if cols * 2 ** (bits - 1) < 2**24:
        sum_out.copy_(values.sum(dim=1))
    else:
        sum_out.copy_(values.to(torch.int32).sum(dim=1))
    scale_out.copy_(scale)
    signed = values.to(torch.int8)
    # q + 2^(bits-1) as an unsigned byte (int8) or nibble (int4) is q with its top bit flipped.
    unsigned = signed.view(torch.uint8).bitwise_xor_(0x80 if bits == 8 else 0x08)
    if bits == 8:
        _tile_into(unsigned, tiled_out)
    else:
        tiled = torch.empty(cols // TILE, rows * TILE, dtype=torch.uint8)
        _tile_into(unsigned, tiled)
        tiled_out.copy_(pack_int4(tiled))


def _tile_into(values: torch.Tensor, out: torch.Tensor) -> None:
    """tile4 of uint8 `[R, I]` into `out` `[I/4, R*4]`, in two cheap steps: a byte transpose to
    `[I, R]`, then moving whole 4-byte groups (`o%4 = 0..3` of one input)."""
    rows, cols = values.shape
    transposed = values.t().contiguous()
    groups = transposed.view(torch.int32).view(cols // TILE, TILE, rows // TILE)
    out.view(torch.int32).view(cols // TILE, rows // TILE, TILE).copy_(groups.permute(0, 2, 1))


def quantize_tiled(rows: torch.Tensor, bits: int, compiled: bool = True) -> QuantizedRows:
    """Quantize a `[R, I]` chunk and lay it out as stored (offset to unsigned, tiled)."""
    count, cols = rows.shape
    result = QuantizedRows(
        torch.empty(cols // TILE, count * bits // 2, dtype=torch.uint8),
        torch.empty(count),
        torch.empty(count, dtype=torch.int32),
    )
    quantize_rows(rows, bits, result.tiled, result.scale, result.row_sum, compiled)
    return result


def dequantize_tiled(data: torch.Tensor, scale: torch.Tensor, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Stored bytes + scales -> float32 `[O, I]` weights."""
    raw = unpack_int4(data) if bits == 4 else data
    signed = raw.to(torch.int16) - 2 ** (bits - 1)
    return untile(signed, out_features, in_features).to(torch.float32) * scale[:, None]


def tile_float(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float `[R, I]` chunk in tile4 layout as `[I/4, R*4]` of `dtype` (fp16 LoRA, float weights)."""
    return tile(rows.to(dtype)).reshape(rows.shape[1] // TILE, -1)
