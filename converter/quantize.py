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

import torch

TILE = 4


@dataclass(frozen=True)
class QuantizedRows:
    """One chunk of rows, quantized and already in tiled byte layout."""

    tiled: torch.Tensor  # uint8 [I/4, R*4] (int8) or [I/4, R*2] (int4, two per byte)
    scale: torch.Tensor  # float32 [R]
    row_sum: torch.Tensor  # int32 [R]: sum of the signed quantized values of each row


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_rows(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a float32 `[R, I]` chunk: (int8 values, f32 scales)."""
    limit = qmax(bits)
    bound = rows.abs().amax(dim=1)
    scale = bound / limit
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    values = torch.round(rows / scale[:, None]).clamp_(-limit - 1, limit).to(torch.int8)
    return values, scale


def tile(rows: torch.Tensor) -> torch.Tensor:
    """`[R, I]` -> `[I/4, R/4, 4, 4]` (contiguous): the tile4 layout of a row chunk."""
    r, i = rows.shape
    return rows.reshape(r // TILE, TILE, i // TILE, TILE).permute(2, 0, 3, 1).contiguous()


def untile(tiled: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `tile` on a whole tensor: flat tile4 data -> `[O, I]`."""
    grid = tiled.reshape(in_features // TILE, out_features // TILE, TILE, TILE)
    return grid.permute(1, 3, 0, 2).reshape(out_features, in_features)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pairs of uint4 along the last axis -> bytes, the even element in the low nibble."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes -> uint4 values (low nibble first), doubling the last axis."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_tiled(rows: torch.Tensor, bits: int) -> QuantizedRows:
    """Quantize a float32 `[R, I]` chunk and lay it out as stored (offset to unsigned, tiled)."""
    values, scale = quantize_rows(rows, bits)
    row_sum = values.sum(dim=1, dtype=torch.int32)
    offset = 2 ** (bits - 1)
    unsigned = (values.to(torch.int16) + offset).to(torch.uint8) if bits != 8 else values.view(torch.uint8) ^ 0x80
    tiled = tile(unsigned).reshape(rows.shape[1] // TILE, -1)
    if bits == 4:
        tiled = pack_int4(tiled)
    return QuantizedRows(tiled, scale, row_sum)


def dequantize_tiled(data: torch.Tensor, scale: torch.Tensor, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Stored bytes + scales -> float32 `[O, I]` weights."""
    raw = unpack_int4(data) if bits == 4 else data
    signed = raw.to(torch.int16) - 2 ** (bits - 1)
    return untile(signed, out_features, in_features).to(torch.float32) * scale[:, None]


def tile_float(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float `[R, I]` chunk in tile4 layout as `[I/4, R*4]` of `dtype` (fp16 LoRA, float weights)."""
    return tile(rows.to(dtype)).reshape(rows.shape[1] // TILE, -1)
