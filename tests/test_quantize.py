"""Quantization and tiling against a slow reference written straight from the format spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from converter import quantize


def reference_quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's math in plain numpy: f32 bound/qmax, zero scale -> 1, f32 division, half-even."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    scale = (np.abs(w).max(axis=1) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(w / scale[:, None]), -qmax - 1, qmax).astype(np.int8)
    return q, scale


def reference_tile(values: np.ndarray) -> np.ndarray:
    """Element W[o, i] goes to ((i//4)*(O/4) + o//4)*16 + (i%4)*4 + o%4, by explicit indexing."""
    rows, cols = values.shape
    out = np.zeros(rows * cols, dtype=values.dtype)
    o, i = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out[((i // 4) * (rows // 4) + o // 4) * 16 + (i % 4) * 4 + o % 4] = values
    return out


def stored_bytes(w: np.ndarray, bits: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    q, scale = reference_quantize(w, bits)
    unsigned = reference_tile((q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8))
    if bits == 4:
        unsigned = unsigned[0::2] | (unsigned[1::2] << 4)
    return unsigned.tobytes(), scale, q.sum(axis=1, dtype=np.int32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(8, 12), (64, 256), (36, 4)])
def test_quantize_tiled_matches_reference(bits, shape):
    rng = np.random.default_rng(sum(shape) + bits)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[1] = 0.0  # an all-zero row takes scale 1
    result = quantize.quantize_tiled(torch.from_numpy(w), bits)
    expected, scale, sums = stored_bytes(w, bits)
    assert result.tiled.numpy().tobytes() == expected
    np.testing.assert_array_equal(result.scale.numpy(), scale)
    np.testing.assert_array_equal(result.row_sum.numpy(), sums)
    assert result.scale[1] == 1.0


def test_rounding_is_half_to_even():
    # bound 127 gives scale 1.0, so w / scale is w itself
    row = np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -127.0], dtype=np.float32)
    w = np.stack([row, row[::-1], row, row])
    result = quantize.quantize_tiled(torch.from_numpy(w), 8)
    values = quantize.untile(result.tiled.flatten(), 4, 8).to(torch.int16) - 128
    assert values[0].tolist() == [127, 2, -4, 0, 0, 2, 126, -127]


def test_bf16_chunks_quantize_like_their_float32_values():
    w = (torch.randn(16, 32) * 0.02).to(torch.bfloat16)
    a = quantize.quantize_tiled(w, 8)
    b = quantize.quantize_tiled(w.float(), 8)
    assert torch.equal(a.tiled, b.tiled) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_error_is_within_half_a_step(bits):
    w = torch.randn(64, 128)
    q = quantize.quantize_tiled(w, bits)
    restored = quantize.dequantize_tiled(q.tiled.flatten(), q.scale, bits, 64, 128)
    assert ((restored - w).abs() <= q.scale[:, None] / 2 * (1 + 1e-6)).all()


def test_row_chunks_fill_column_bands_of_the_whole_tensor():
    """Quantizing row chunks into bands equals quantizing the whole tensor at once."""
    w = torch.randn(48, 64)
    whole = quantize.quantize_tiled(w, 8)
    tiled = torch.empty(16, 48 * 4, dtype=torch.uint8)
    scale, sums = torch.empty(48), torch.empty(48, dtype=torch.int32)
    quantizer = quantize.RowQuantizer(8, 16, 64)
    for start in range(0, 48, 16):
        quantizer(w[start:start + 16], tiled[:, start * 4:(start + 16) * 4], scale[start:start + 16],
                  sums[start:start + 16])
    assert torch.equal(tiled, whole.tiled) and torch.equal(scale, whole.scale) and torch.equal(sums, whole.row_sum)


def test_tile_untile_and_int4_packing_round_trip():
    x = torch.arange(8 * 12, dtype=torch.int32).reshape(8, 12)
    assert torch.equal(quantize.untile(quantize.tile(x).flatten(), 8, 12), x)
    nibbles = torch.randint(0, 16, (5, 6), dtype=torch.uint8)
    assert torch.equal(quantize.unpack_int4(quantize.pack_int4(nibbles)), nibbles)
    assert quantize.pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21  # low nibble first


def test_tile_float_matches_reference_layout():
    w = torch.randn(8, 16)
    tiled = quantize.tile_float(w, torch.float16)
    assert tiled.numpy().tobytes() == reference_tile(w.numpy().astype(np.float16)).tobytes()
