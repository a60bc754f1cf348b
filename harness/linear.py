"""How the reference runtime keeps a stored weight matrix and multiplies by it.

Float weights (fp32, fp16) are held as float32 (fp16 widens exactly). Quantized weights (int8,
int4) are not loaded at all: they are used where they lie, as the stored tile4 bytes in the
weights file's memory map, with their per-row float32 scales (`tiled.TiledLinear`: products and
embedding rows straight from those bytes, float32 arithmetic on the integers exactly as stored).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol

import torch

from converter.errors import ConversionError
from converter.tflite import FLOAT16, FLOAT32, INT4, INT8, WeightFile

from .tiled import TiledLinear

SMALL_WORK = 1 << 22  # multiply-adds below which one thread is used


class Linear(Protocol):
    """A `[out, in]` weight matrix: `linear(x)` is `x @ W.T`; `rows(ids)` are rows of W in float32."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor: ...


class FloatLinear:
    """A float32 weight (fp32 files, and fp16 ones widened exactly)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


@contextmanager
def threads_for(multiply_adds: int) -> Iterator[None]:
    """One thread for a small amount of work (a tiny model's forward pass): a second thread saves
    microseconds there but can wait a whole scheduler time slice for a busy core (measured on
    2 shared cores: tiny-model tokens 5 ms -> 40 ms)."""
    threads = torch.get_num_threads()
    if multiply_adds >= SMALL_WORK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_linear(weights: WeightFile, name: str, out_features: int, in_features: int) -> Linear:
    """The `[out_features, in_features]` matrix `name` of a weights file, kept as stored."""
    entry = weights.entry(name)
    if entry.type not in (INT8, INT4):
        itemsize = {FLOAT32: 4, FLOAT16: 2}.get(entry.type)
        if itemsize is None or entry.nbytes != out_features * in_features * itemsize:
            raise ConversionError(f"{weights.path}: tensor {name} has {entry.nbytes} bytes of type {entry.type}, "
                                  f"not a float [{out_features}, {in_features}] matrix")
        return FloatLinear(weights.matrix(name, out_features, in_features))
    bits = 8 if entry.type == INT8 else 4
    count = out_features * in_features
    scale_name = f"{name}_quantized_scale"
    if entry.nbytes * 8 != count * bits or scale_name not in weights.tensors:
        raise ConversionError(f"{weights.path}: tensor {name} has {entry.nbytes} bytes (and scales: "
                              f"{scale_name in weights.tensors}), not an int{bits} [{out_features}, {in_features}] matrix")
    scale = torch.from_numpy(weights.raw(scale_name).copy()).view(torch.float32)
    if scale.numel() != out_features:
        raise ConversionError(f"{weights.path}: tensor {scale_name} has {scale.numel()} scales, expected {out_features}")
    return TiledLinear(weights.raw(name), scale, bits, out_features, in_features)
