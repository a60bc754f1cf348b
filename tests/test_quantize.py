"""Quantization and tiling against a slow reference written straight from the format spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from converter import fused, quantize

# Both quantizer paths: the compiled one (numba) and the torch one it must equal byte for byte.
PATHS = pytest.mark.parametrize("compiled", [
    pytest.param(True, id="compiled", marks=pytest.mark.skipif(fused.kernel is None, reason="numba not installed")),
    pytest.param(False, id="torch"),
])


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


@PATHS
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(8, 12), (64, 256), (36, 4)])
def test_quantize_tiled_matches_reference(bits, shape, compiled):
    rng = np.random.default_rng(sum(shape) + bits)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[1] = 0.0  # an all-zero row takes scale 1
    result = quantize.quantize_tiled(torch.from_numpy(w), bits, compiled)
    expected, scale, sums = stored_bytes(w, bits)
    assert result.tiled.numpy().tobytes() == expected
    np.testing.assert_array_equal(result.scale.numpy(), scale)
    np.testing.assert_array_equal(result.row_sum.numpy(), sums)
    assert result.scale[1] == 1.0


@PATHS
def test_rounding_is_half_to_even(compiled):
    # bound 127 gives scale 1.0, so w / scale is w itself
    row = np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -127.0], dtype=np.float32)
    w = np.stack([row, row[::-1], row, row])
    result = quantize.quantize_tiled(torch.from_numpy(w), 8, compiled)
    values = quantize.untile(result.tiled.flatten(), 4, 8).to(torch.int16) - 128
    assert values[0].tolist() == [127, 2, -4, 0, 0, 2, 126, -127]


@PATHS
def test_bf16_chunks_quantize_like_their_float32_values(compiled):
    w = (torch.randn(16, 32) * 0.02).to(torch.bfloat16)
    a = quantize.quantize_tiled(w, 8, compiled)
    b = quantize.quantize_tiled(w.float(), 8, compiled)
    assert torch.equal(a.tiled, b.tiled) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_error_is_within_half_a_step(bits):
    w = torch.randn(64, 128)
    q = quantize.quantize_tiled(w, bits)
    restored = quantize.dequantize_tiled(q.tiled.flatten(), q.scale, bits, 64, 128)
    assert ((restored - w).abs() <= q.scale[:, None] / 2 * (1 + 1e-6)).all()


@PATHS
@pytest.mark.parametrize("bits", [8, 4])
def test_row_chunks_fill_column_bands_of_the_whole_tensor(bits, compiled):
    """Quantizing row chunks into bands equals quantizing the whole tensor at once."""
    w = torch.randn(48, 64)
    whole = quantize.quantize_tiled(w, bits, compiled)
    band = bits // 2  # bytes per row in each tiled row
    tiled = torch.empty(16, 48 * band, dtype=torch.uint8)
    scale, sums = torch.empty(48), torch.empty(48, dtype=torch.int32)
    for start in range(0, 48, 16):
        quantize.quantize_rows(w[start:start + 16], bits, tiled[:, start * band:(start + 16) * band],
                               scale[start:start + 16], sums[start:start + 16], compiled)
    assert torch.equal(tiled, whole.tiled) and torch.equal(scale, whole.scale) and torch.equal(sums, whole.row_sum)


@pytest.mark.skipif(fused.kernel is None, reason="numba not installed")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_and_torch_paths_give_the_same_bytes(bits, dtype):
    """Awkward values: ties at every half step, zero rows, one huge outlier, tiny values, and rows
    wide enough that the int8 torch path sums in int32 (cols * 128 >= 2^24)."""
    generator = torch.Generator().manual_seed(bits)
    for rows, cols in ((12, 40), (8, 2**17 + 4)):
        w = torch.randn(rows, cols, generator=generator) * 0.02
        w[1] = 0.0
        qmax = 2 ** (bits - 1) - 1
        w[2] = (torch.arange(cols) % (2 * qmax + 1) - qmax) / 2  # bound qmax/2: every value a tie
        w[2, 0] = qmax / 2
        w[3, 5] = 3e4  # an outlier: the rest of the row rounds to 0
        w[4] *= 1e-30 if dtype == torch.float32 else 1e-3
        w = w.to(dtype)
        a = quantize.quantize_tiled(w, bits, compiled=True)
        b = quantize.quantize_tiled(w, bits, compiled=False)
        assert torch.equal(a.tiled, b.tiled) and torch.equal(a.scale, b.scale) and torch.equal(a.row_sum, b.row_sum)


@PATHS
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_row_with_nan_or_inf_gets_a_non_finite_scale(bad, compiled):
    w = torch.randn(8, 16)
    w[5, 3] = bad
    scale = quantize.quantize_tiled(w.to(torch.bfloat16), 8, compiled).scale
    assert torch.isfinite(scale).tolist() == [True] * 5 + [False] + [True] * 2


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
