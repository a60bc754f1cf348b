"""The products on stored tile4 bytes (harness/tiled.py) against the float64 product of the weights the
converter's own decoder gives, for every path: the compiled kernel (a few rows), float32 sgemm over
widened blocks (compiled or torch widening), int8 and int4, shapes the file format allows."""
from __future__ import annotations

import pytest
import torch

from converter import quantize
from harness import tiled

SHAPES = [(4, 4), (36, 20), (1000, 300), (16388, 8)]  # one tile; odd tile counts; several blocks and rows per
# thread, a partial run; rows wider than one int8 kernel slab (tiled.SLAB bytes), the last slab partial


def stored(out_features: int, in_features: int, bits: int):
    weights = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(out_features + bits))
    rows = quantize.quantize_tiled(weights, bits)
    exact = quantize.dequantize_tiled(rows.tiled.flatten(), rows.scale, bits, out_features, in_features).double()
    return tiled.TiledLinear(rows.tiled.flatten().numpy(), rows.scale, bits, out_features, in_features), exact


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("path", ["kernel", "sgemm", "sgemm-torch"])
def test_product_is_a_float32_dot_product_of_the_stored_weights(bits, path, monkeypatch):
    """Every output is within float32 summation's worst case, (I + 2) * 2^-24 * sum |x| |W|, of the
    exact product: the stored integers are used exactly (a misplaced or mis-offset byte is off by
    far more)."""
    if path == "kernel" and tiled.KERNELS[bits] is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(tiled, "KERNEL_ROWS", 64 if path == "kernel" else 0)
    monkeypatch.setattr(tiled, "COLUMNS", 12)  # blocks of 3 output tiles: several, the last partial
    if path == "sgemm-torch":
        monkeypatch.setattr(tiled, "WIDEN", None)
    generator = torch.Generator().manual_seed(bits)
    for out_features, in_features in SHAPES:
        linear, exact = stored(out_features, in_features, bits)
        for count in (1, 3):
            x = torch.randn(count, in_features, generator=generator) * torch.logspace(-3, 2, in_features)
            reference = x.double() @ exact.T
            bound = (in_features + 2) * 2.0 ** -24 * (x.double().abs() @ exact.abs().T)
            ours = linear(x)
            assert ours.dtype == torch.float32 and ours.shape == reference.shape
            assert ((ours.double() - reference).abs() <= bound).all(), (out_features, in_features, count)


def test_rows_past_kernel_rows_take_the_sgemm_path(monkeypatch):
    """A prompt's rows go through the blocked sgemm, and leading dimensions are kept."""
    linear, exact = stored(36, 20, 8)
    calls = []
    monkeypatch.setattr(tiled.TiledLinear, "_blocked", lambda self, rows: calls.append(len(rows)) or rows @ exact.T.float())
    x = torch.randn(2, tiled.KERNEL_ROWS + 1, 20)
    assert linear(x).shape == (2, tiled.KERNEL_ROWS + 1, 36) and calls == [2 * (tiled.KERNEL_ROWS + 1)]


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_rows_are_read_from_the_stored_bytes(bits):
    """Looked-up rows come from the file's tile4 bytes (no second copy of the embedding): they are
    the rows of the matrix the converter's own decoder (`dequantize_tiled`) gives."""
    linear, exact = stored(24, 16, bits)
    ids = torch.tensor([23, 0, 5, 6, 7, 5])  # every position in a tile (o % 4), and a repeat
    assert torch.equal(linear.rows(ids).double(), exact[ids])

