"""How the reference runtime keeps a stored weight matrix and multiplies by it.

Float weights (fp32, fp16) are held as float32 (fp16 widens exactly). Quantized weights (int8,
int4) stay as their stored integers (one int8 per value) with their per-row float32 scales and
are never dequantized to a float copy. A product `x @ (q * scale).T` runs on an exact
int8 x int8 -> int32 matmul: each float32 activation row is written as
`unit * (d0 + d1 / 254 + d2 / 254**2 + d3 / 254**3)` with int8 digits `d` (`unit = max|x| / 127`),
all digit rows go through one integer matmul (the weights are read once), and the per-digit
results are combined in float64. Four digits leave an activation error below
`max|x| * 3e-10`, far under float32 rounding, so the result is the float32 product with the
weights exactly as stored, at int8 memory traffic. On x86 the weights are packed once for
oneDNN's int8 kernels (what PyTorch's own quantized inference uses). With VNNI they are exact
for all 8-bit digits; without (AVX2 only) they add unsigned x signed byte pairs in saturating
int16, so there the digits have 7 bits (`|d| <= 63`, radix 126, stored unsigned as `d + 64 <= 127`:
a pair sums to at most 2 * 127 * 128 < 2**15) and five of them keep the error below `max|x| * 4e-11`.
A probe picks the first kind that is exact on this CPU; else `torch._int_mm`.
"""
from __future__ import annotations

import ctypes
import functools
import ctypes.util
import mmap
import platform
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from converter import quantize
from converter.errors import ConversionError
from converter.tflite import FLOAT16, FLOAT32, INT4, INT8, WeightFile

SMALL_WORK = 1 << 22  # multiply-adds below which one thread is used
LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
MADV_DONTNEED = 4  # Linux: pages of a read-only file mapping are re-read from the page cache if touched again


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


def int8_digits(x: torch.Tensor, count: int = 4, limit: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [M, K] float32 -> (`unit` [M, 1] float64, digits [count * M, K] in [-limit, limit], as
    float32) with `x = unit * sum_j digits[j] / (2 * limit)**j` up to `unit * 0.5 / (2 * limit)**(count - 1)`
    (|residual| <= 0.5 after rounding, so residual * 2 * limit is again a digit)."""
    unit = x.abs().amax(-1, keepdim=True) / limit
    unit = torch.where(unit == 0, torch.ones_like(unit), unit)
    residual = x / unit
    digits = torch.empty(count, *x.shape)
    for j in range(count):
        torch.round(residual, out=digits[j])
        residual = (residual - digits[j]) * (2 * limit)
    return unit.double(), digits.view(-1, x.shape[-1])


class IntegerProduct(Protocol):
    """`product(digits)`: `digits` [R, in] (int8 values as float32) times `values.T`, times the
    row scales: exact integer sums, scaled in float32 -> [R, out]."""

    def __call__(self, digits: torch.Tensor) -> torch.Tensor: ...


class OneDnnProduct:
    """oneDNN's int8 matmul (x86) on weights packed once: unsigned digits (zero point 128) times
    signed values, int32 sums scaled per output row into float32."""

    DIGITS, LIMIT, ZERO = 4, 127, 128

    def __init__(self, values: torch.Tensor, scale: torch.Tensor):
        self.packed = torch.ops.onednn.qlinear_prepack(values, None)
        self.scale, self.zero_points = scale, torch.zeros(values.shape[0], dtype=torch.int32)

    def __call__(self, digits: torch.Tensor) -> torch.Tensor:
        unsigned = (digits + self.ZERO).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(unsigned, 1.0, self.ZERO, self.packed, self.scale, self.zero_points,
                                                  None, 1.0, 0, torch.float32, "none", [], "")


class SevenBitOneDnnProduct(OneDnnProduct):
    """oneDNN's int8 matmul with 7-bit digits (zero point 64, unsigned at most 127): exact without VNNI."""

    DIGITS, LIMIT, ZERO = 5, 63, 64


class IntMmProduct:
    """torch's portable int8 x int8 -> int32 matmul, for CPUs without oneDNN's int8 kernels."""

    DIGITS, LIMIT = 4, 127

    def __init__(self, values: torch.Tensor, scale: torch.Tensor):
        self.values, self.scale = values, scale

    def __call__(self, digits: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(digits.to(torch.int8), self.values.T).to(torch.float32) * self.scale


Product = type[OneDnnProduct] | type[IntMmProduct]


def is_exact(product: type[OneDnnProduct]) -> bool:
    """Whether `product` sums the largest digits times the largest values (both signs, -128 too) exactly."""
    top = product.LIMIT
    values = torch.tensor([[127, -128] * 32, [-128, 127] * 32, [127] * 64, [-128] * 64], dtype=torch.int8)
    digits = torch.tensor([[top] * 64, [-top] * 64, [top, -top] * 32, [-top, top] * 32], dtype=torch.float32)
    exact = digits.double() @ values.double().T
    return torch.equal(product(values, torch.ones(values.shape[0]))(digits).double(), exact)


@functools.cache
def exact_product() -> Product:
    """oneDNN's kernels with 8-bit digits where they are exact (VNNI), else with 7-bit digits
    (AVX2 only, e.g. some AMD EPYC: saturating int16 pair sums), else `torch._int_mm`: a worst-case
    probe decides, not the CPU's name."""
    if not torch.backends.mkldnn.is_available() or platform.machine() not in ("x86_64", "AMD64"):
        return IntMmProduct
    return next((p for p in (OneDnnProduct, SevenBitOneDnnProduct) if is_exact(p)), IntMmProduct)


PRODUCT: Product | None = None  # None: exact_product(), probed on first use


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


@dataclass(frozen=True)
class StoredRows:
    """Rows of a quantized matrix gathered from its stored tile4 bytes (the file's memory map), so an
    embedding that is also the output projection is held once, as its product's integers; the pages
    a lookup touched are dropped again. `rows(ids)` is W[ids] in float32."""

    data: np.ndarray  # uint8: the tensor's bytes in the file, q + 2^(bits-1) in tile4 order
    scale: torch.Tensor  # float32 [out]
    bits: int
    out_features: int
    in_features: int

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        index = ids.numpy()
        grid = (self.in_features // quantize.TILE, self.out_features // quantize.TILE, quantize.TILE)
        if self.bits == 8:  # [n, I/4, 4]: W[o, 4a + c] sits at tile (a, o // 4), place (c, o % 4)
            stored = self.data.reshape(*grid, 4)[:, index // 4, :, index % 4]
        else:  # two values a byte, the even output in the low nibble
            pairs = self.data.reshape(*grid, 2)[:, index // 4, :, index % 4 // 2]
            stored = pairs >> (4 * (index % 2))[:, None, None] & 0x0F
        release_pages(self.data)
        values = stored.astype(np.int16) - 2 ** (self.bits - 1)
        return torch.from_numpy(values.reshape(len(index), -1)).to(torch.float32) * self.scale[ids, None]


class QuantizedLinear:
    """Stored int8/int4 values `q` [out, in] and row scales [out]: W = q * scale[:, None]. Products use
    the product class's copy of the values; `rows` come from the file's bytes (`StoredRows`), when given."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, stored: StoredRows | None = None):
        self.scale = scale
        self.stored = stored
        self.product = (PRODUCT or exact_product())(values, scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        count, limit = self.product.DIGITS, self.product.LIMIT
        unit, digits = int8_digits(rows.to(torch.float32), count, limit)
        sums = self.product(digits).view(count, rows.shape[0], -1)
        total = sums[-1].double()
        for j in range(count - 2, -1, -1):  # in place, Horner: d0 + (d1 + (d2 + d3 / R) / R) / R
            total.div_(2 * limit).add_(sums[j])
        return total.mul_(unit).to(torch.float32).view(*x.shape[:-1], -1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.stored is None:
            raise ValueError("rows() of a QuantizedLinear built without its stored bytes")
        return self.stored(ids)


def load_linear(weights: WeightFile, name: str, out_features: int, in_features: int, lookup: bool = False) -> Linear:
    """The `[out_features, in_features]` matrix `name` of a weights file, kept as stored; `lookup`
    if its rows are also looked up (an embedding)."""
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
    raw = weights.raw(name)
    stored = torch.from_numpy(raw.copy())
    release_pages(raw)
    values = quantize.untile(quantize.unpack_int4(stored) if bits == 4 else stored, out_features, in_features).contiguous()
    del stored  # only the untiled copy from here on
    # Stored values are q + 2^(bits-1): flipping the top bit of the byte (int8) or subtracting 8 (int4) gives q.
    signed = values.bitwise_xor_(0x80).view(torch.int8) if bits == 8 else values.view(torch.int8).sub_(8)
    scale = torch.from_numpy(weights.raw(scale_name).copy()).view(torch.float32)
    if scale.numel() != out_features:
        raise ConversionError(f"{weights.path}: tensor {scale_name} has {scale.numel()} scales, expected {out_features}")
    return QuantizedLinear(signed, scale, StoredRows(raw, scale, bits, out_features, in_features) if lookup else None)


def release_pages(mapped: np.ndarray) -> None:
    """Drop a memory-mapped region's pages from this process once copied (Linux; the page cache
    keeps them), so loading does not leave the whole file resident next to the loaded weights."""
    if LIBC is None or mapped.size == 0 or not isinstance(mapped, np.memmap):
        return  # anonymous memory would be zeroed, not re-read
    page = mmap.PAGESIZE
    start = mapped.ctypes.data // page * page
    end = mapped.ctypes.data + mapped.nbytes
    LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
