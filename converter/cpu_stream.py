"""CPU models of any size: litert-torch builds the graph once from placeholder weights, and our
int8 weights are streamed into its buffers from the memory-mapped checkpoint.

A litert-torch graph depends on the shapes of the weights, not their values. So every matrix
parameter gets a placeholder costing one number: a stride-0 view of `marker(k)`, distinct per
matrix. litert-torch lowers it as a splat constant and quantizes it per channel, which makes every
channel's int8 scale `marker(k) / 127`: the scales name the matrix. Vectors (norm weights) keep
their real values, so litert-torch writes them itself, folded however its graph needs.
`stream_weights` then copies that template and overwrites, for each matrix, its int8 bytes
(row-major `[O, I]`) and its per-channel scales (float32 `[O]`) with ours, computed row chunk by
row chunk; no weight is ever held whole in memory.

Measured limit (litert-torch 0.10): placeholders keep the torch side small (GEMMA_2B shape: 0.9 GiB
through export and lowering, against 14.7 GiB for litert-torch's example, which loads float32
weights), but litert-torch then writes a float32 flatbuffer (splats expanded) and hands it to
ai-edge-quantizer, so building the graph itself still takes the float model's memory: the
GEMMA_2B-shaped graph build was stopped at 18 GiB here. The graph is built once per shape; the
streaming step needs only the template.
"""
from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema

from .checkpoint import TensorSource
from .errors import ConversionError
from .files import atomic_output

INT8_MAX = 127
ZERO_ROW_BOUND = 1e-9  # the TFLite converter's bound for an all-zero channel
MARKER_UNIT = 2.0**-12  # marker(k) = (k + 1) * MARKER_UNIT: exact in float32 for k < 2^24
CHUNK_ELEMENTS = 1 << 22  # weights quantized per chunk (16 MB as float32)
# vtable slots (4 + 2 * field number in schema.fbs) the generated accessors use.
BUFFER_DATA_SLOT = 4
QUANTIZATION_SCALE_SLOT = 8


def marker(index: int) -> float:
    return (index + 1) * MARKER_UNIT


def marker_index(scale: float) -> int:
    """The matrix whose placeholder quantizes to this per-channel scale (-1 when none)."""
    index = round(scale * INT8_MAX / MARKER_UNIT) - 1
    return index if index >= 0 and np.float32(marker(index) / INT8_MAX) == np.float32(scale) else -1


def use_placeholders(model: torch.nn.Module, vectors: Mapping[str, torch.Tensor],
                     tied: Mapping[str, str] = {}) -> list[str]:
    """Give a model (built on the meta device) its placeholders: matrices become marker splats, in
    `named_parameters` order, every vector takes its value from `vectors`; a parameter named in
    `tied` shares the placeholder of the one it maps to. Returns the matrix names, marker k naming
    the k-th."""
    matrices: list[str] = []
    placed: dict[str, torch.nn.Parameter] = {}
    parameters = list(model.named_parameters(remove_duplicate=False))
    for name, param in sorted(parameters, key=lambda item: item[0] in tied):  # tied ones last
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if param.dim() >= 2:
            key = tied.get(name, name)
            if key not in placed:
                value = torch.full((1,) * param.dim(), marker(len(matrices))).expand(param.shape)
                placed[key] = torch.nn.Parameter(value, requires_grad=False)
                matrices.append(name)
            setattr(owner, attribute, placed[key])
        elif name not in vectors:
            raise ConversionError(f"no value for the graph's vector parameter {name}")
        else:
            value = vectors[name].to(torch.float32)
            if tuple(value.shape) != tuple(param.shape):
                raise ConversionError(f"{name}: shape {tuple(value.shape)}, the graph expects {tuple(param.shape)}")
            setattr(owner, attribute, torch.nn.Parameter(value, requires_grad=False))
    return matrices


@contextmanager
def distinct_constants() -> Iterator[None]:
    """While exporting: litert-torch 0.10 reuses a lowered constant for any tensor of the same shape
    at the same address, and a placeholder's contiguous copy is freed right after it is lowered, so
    the next one of its shape can get the same address and be merged with it. Key that cache by the
    tensor's first value too (markers differ; real weights sharing an address share it)."""
    from litert_torch.backend import inline_consts

    fingerprint = inline_consts._ConstantFingerprint
    original = fingerprint.__dict__["from_tensor"]

    def keyed(cls, tensor: torch.Tensor) -> tuple:
        first = float(tensor.reshape(-1)[0]) if tensor.numel() else None
        return original.__func__(cls, tensor), first

    fingerprint.from_tensor = classmethod(keyed)
    try:
        yield
    finally:
        fingerprint.from_tensor = original


def quantize_rows(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8, as the TFLite converter quantizes a weight per channel:
    `scale = max(max|w|, 1e-9) / 127`, `q = round(w / scale)` with halves away from zero.
    |w| <= max|w| keeps |w / scale| <= 127 (+ rounding error < 0.5), so no clamp is needed."""
    values = rows.to(torch.float32)
    scale = values.abs().amax(dim=1).clamp_min_(ZERO_ROW_BOUND).div_(INT8_MAX)
    values.div_(scale[:, None])
    q = values.abs().add_(0.5).floor_().copysign_(values)
    return q.to(torch.int8).numpy(), scale.numpy()


@dataclass
class _Slots:
    """Where one matrix lives in the template: its data buffers and its scale vectors."""

    shape: tuple[int, int] | None = None
    data: set[tuple[int, int]] = field(default_factory=set)  # (file position, bytes)
    scales: set[int] = field(default_factory=set)  # file position of float32 [O]


def _buffer_position(buffer: schema.Buffer) -> int:
    if buffer.Offset():  # data outside the flatbuffer (models over 2 GiB), from the file's start
        return int(buffer.Offset())
    return buffer._tab.Vector(buffer._tab.Offset(BUFFER_DATA_SLOT))


def find_matrices(data: mmap.mmap | bytes, count: int, path: Path) -> list[_Slots]:
    """Locate the `count` marked int8 matrices of a template file; each must be found."""
    model = schema.Model.GetRootAs(data, 0)
    slots = [_Slots() for _ in range(count)]
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            quant = tensor.Quantization()
            if tensor.Type() != schema.TensorType.INT8 or quant is None or quant.ScaleLength() == 0:
                continue
            scales = quant.ScaleAsNumpy()
            index = marker_index(float(scales[0]))
            if index < 0 or index >= count:
                continue
            shape = tuple(int(n) for n in tensor.ShapeAsNumpy())
            if len(shape) != 2 or len(scales) != shape[0] or np.any(scales != scales[0]):
                raise ConversionError(f"{path}: matrix {index} is not quantized per output channel")
            slot = slots[index]
            if slot.shape not in (None, shape):
                raise ConversionError(f"{path}: matrix {index} appears as {slot.shape} and {shape}")
            slot.shape = (shape[0], shape[1])
            buffer = model.Buffers(tensor.Buffer())
            slot.data.add((_buffer_position(buffer), shape[0] * shape[1]))
            slot.scales.add(quant._tab.Vector(quant._tab.Offset(QUANTIZATION_SCALE_SLOT)))
    missing = [str(k) for k, slot in enumerate(slots) if slot.shape is None]
    if missing:
        raise ConversionError(f"{path}: no int8 tensor for matrices {', '.join(missing)} (quantize int8 per channel)")
    return slots


class _Writer:
    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data: np.ndarray, position: int) -> None:
        view = np.ascontiguousarray(data).data.cast("B")
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written


def _stream_matrix(source: TensorSource, names: Sequence[str], slot: _Slots, writer: _Writer, label: str) -> None:
    """Quantize the rows of `names` (stacked) into the matrix's buffers and scales."""
    assert slot.shape is not None
    rows, cols = slot.shape
    shapes = [tuple(source.info(name).shape) for name in names]
    if any(len(s) != 2 or s[1] != cols for s in shapes) or sum(s[0] for s in shapes) != rows:
        raise ConversionError(f"{label}: the graph holds a [{rows}, {cols}] matrix, the checkpoint gives "
                              f"{' + '.join(str(list(s)) for s in shapes)}")
    scales = np.empty(rows, dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // cols)
    row = 0
    for name, (count, _) in zip(names, shapes):
        for start in range(0, count, step):
            stop = min(start + step, count)
            with source.rows(name, start, stop) as chunk:
                if not bool(torch.isfinite(chunk).all()):
                    raise ConversionError(f"tensor {name} has NaN or Inf values (rows {start}-{stop - 1})")
                q, scale = quantize_rows(chunk)
            for position, _ in slot.data:
                writer.write(q, position + (row + start) * cols)
            scales[row + start: row + stop] = scale
        row += count
    for position in slot.scales:
        writer.write(scales, position)


def stream_weights(template: Path, output: Path, source: TensorSource,
                   matrices: Sequence[Sequence[str]], labels: Sequence[str]) -> None:
    """Write `output`: the template with matrix k's int8 weights and scales taken from the rows of
    checkpoint tensors `matrices[k]` (stacked in order, e.g. q, k and v for a fused projection)."""
    with open(template, "rb") as handle:  # the map closes when its last numpy view is gone
        slots = find_matrices(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), len(matrices), template)
    with atomic_output(output) as out:
        with open(template, "rb") as handle:
            shutil.copyfileobj(handle, out, 16 << 20)
        out.flush()
        writer = _Writer(out.fileno())
        for names, slot, label in zip(matrices, slots, labels):
            _stream_matrix(source, names, slot, writer, label)
