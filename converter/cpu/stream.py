"""int8 CPU graphs of any size: litert-torch builds the graph from placeholder matrices, our int8
weights are streamed into it from the memory-mapped checkpoint.

A litert-torch graph depends on the shapes of the weights, not their values. So each kind of
matrix (the embedding, every layer's fused q/k/v, o, gate, up, down, ...) gets one placeholder
costing one number, shared by all layers: a stride-0 view of `marker(k)`. litert-torch lowers a
shared constant once, so its float32 flatbuffer holds one layer's matrices and the embedding, not
the whole model, and its int8 per-channel scales (`marker(k) / 127`) name the kind. Vectors (norm
weights, biases) keep their real values: litert-torch writes them itself, folded however its
graph needs (so a graph belongs to one base checkpoint, see cache.py).

`unshare` then gives every layer its own tensors: in each subgraph the n-th operator (in op
order, which follows the layers: each layer reads the one before; a signature may lack the last
layers' tail, e.g. prefill, whose outputs are the KV cache only) reading a layer kind's shared
tensor gets layer n's own tensor, a copy with its own scales, and one buffer per layer and kind,
shared by all signatures as litert-torch shares them. The matrices' bytes go after the
flatbuffer, by offset and size (TFLite reads buffers so; files over 2 GiB need it), and
`write_model` streams our int8 weights and scales into them, computed row chunk by row chunk as
the TFLite converter quantizes per channel; no matrix is ever held whole in memory.
"""
from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema

from ..errors import ConversionError
from ..files import pwrite_all
from ..plan import ConversionPlan
from ..tflite import roundup
from .graph import Rows, load_tensors, read_rows, weight_rows

INT8_MAX = 127
ZERO_ROW_BOUND = 1e-9  # the TFLite converter's bound for an all-zero channel
MARKER_UNIT = 2.0**-12  # marker(k) = (k + 1) * MARKER_UNIT: exact in float32 for k < 2^24
CHUNK_ELEMENTS = 1 << 22  # weights quantized per chunk (16 MB as float32)
DATA_ALIGNMENT, FILE_ALIGNMENT = 64, 4096
LAYER = "{i}"  # in a kind's name: one matrix per layer
_LAYER_INDEX = re.compile(r"\.\d+\.")
_UNPLACED = 1 << 62  # a buffer offset before layout (nonzero, so the packed size does not change)
# vtable slots (4 + 2 * field number in schema.fbs) the generated accessors use.
BUFFER_DATA_SLOT = 4
QUANTIZATION_SCALE_SLOT = 8


def marker(index: int) -> float:
    return (index + 1) * MARKER_UNIT


def marker_index(scale: float) -> int:
    """The matrix whose placeholder quantizes to this per-channel scale (-1 when none)."""
    index = round(scale * INT8_MAX / MARKER_UNIT) - 1
    return index if index >= 0 and np.float32(marker(index) / INT8_MAX) == np.float32(scale) else -1


def place_markers(plan: ConversionPlan, model: torch.nn.Module, config: Any) -> list[str]:
    """Load a model built on the meta device: one marker placeholder per kind of matrix (a tied
    lm_head shares the embedding's), real vectors. Returns the kinds, marker k naming the k-th
    (a parameter name, "{i}" standing for the layer in a layer's matrices)."""
    rows = weight_rows(plan, config)
    kinds: list[str] = []
    placed: dict[Any, torch.nn.Parameter] = {}
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in rows:
            continue  # load_tensors names it
        if param.dim() < 2:
            state[name] = read_rows(plan, rows[name])
            continue
        kind = _LAYER_INDEX.sub(f".{LAYER}.", name, count=1)
        key = kind if LAYER in kind else rows[name]  # a global matrix is known by its rows (ties)
        if key not in placed:
            value = torch.full((1,) * param.dim(), marker(len(kinds))).expand(param.shape)
            placed[key] = torch.nn.Parameter(value, requires_grad=False)
            kinds.append(kind)
        if placed[key].shape != param.shape:
            raise ConversionError(f"--backend cpu: {name} is {list(param.shape)}, other layers' "
                                  f"{list(placed[key].shape)}; layers of one shape only are streamed")
        state[name] = placed[key]
    load_tensors(plan, model, state)
    return kinds


def matrix_rows(plan: ConversionPlan, config: Any, kinds: Sequence[str]) -> list[tuple[str, Rows]]:
    """The unshared graph's matrices in order (see `unshare`): parameter name and checkpoint rows."""
    rows = weight_rows(plan, config)
    names = [kind.format(i=i) for kind in kinds for i in (range(plan.dims.num_layers) if LAYER in kind else [0])]
    missing = [name for name in names if name not in rows]
    if missing:
        raise ConversionError(f"--backend cpu: the CPU graph's matrix {missing[0]} is not {plan.family.name}'s")
    return [(name, rows[name]) for name in names]


@contextmanager
def distinct_constants() -> Iterator[None]:
    """While exporting: litert-torch 0.10 reuses a lowered constant for any tensor of the same shape
    at the same address, and a placeholder's contiguous copy is freed right after it is lowered, so
    the next one of its shape (another kind) can get the same address and be merged with it. Key
    that cache by the tensor's first value too (the markers differ)."""
    from litert_torch.backend import inline_consts

    fingerprint = inline_consts._ConstantFingerprint
    original = fingerprint.__dict__["from_tensor"]

    def keyed(cls: Any, tensor: torch.Tensor) -> tuple:
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


def _kind_of(tensor: schema.TensorT, kinds: int) -> int:
    """The marker kind of a template tensor, or -1."""
    quant = tensor.quantization
    if tensor.type != schema.TensorType.INT8 or quant is None or quant.scale is None or len(quant.scale) == 0:
        return -1
    index = marker_index(float(quant.scale[0]))
    return index if index < kinds else -1


@dataclass
class Unshared:
    """The model's flatbuffer (matrices by offset, after it) and the file's size."""

    flatbuffer: bytes
    file_size: int


def unshare(template: bytes, kinds: Sequence[str], layers: int, label: str) -> Unshared:
    """Give every layer its own copy of each layer kind's tensor and buffer (see the module
    docstring); matrix m (in `matrix_rows` order) is marked `marker(m)`."""
    model = schema.ModelT.InitFromPackedBuf(template, 0)
    final: dict[tuple[int, int], int] = {}
    for k, kind in enumerate(kinds):
        for layer in range(layers) if LAYER in kind else [0]:
            final[(k, layer)] = len(final)
    buffer_of: dict[int, int] = {}  # matrix -> buffer
    shapes: dict[int, tuple[int, int]] = {}
    for graph in model.subgraphs or []:
        kind_at = {i: k for i, tensor in enumerate(graph.tensors or []) if (k := _kind_of(tensor, len(kinds))) >= 0}
        readers: Counter[int] = Counter()
        copies: dict[tuple[int, int], int] = {}  # (template tensor, layer) -> tensor
        for op in graph.operators or []:
            op.inputs = [int(i) for i in (op.inputs if op.inputs is not None else [])]
            for position, index in enumerate(op.inputs):
                if index not in kind_at:
                    continue
                k = kind_at[index]
                layer = readers[index] if LAYER in kinds[k] else 0
                readers[index] += 1
                if (k, layer) not in final:
                    raise ConversionError(f"{label}: {kinds[k]} is read more than {layers} times in a signature")
                if (index, layer) not in copies:
                    reuse = not any(key[0] == index for key in copies)
                    copies[(index, layer)] = _own_tensor(model, graph, index, reuse, final[(k, layer)], buffer_of,
                                                         shapes)
                op.inputs[position] = copies[(index, layer)]
        _check_no_placeholder_left(model, graph, kind_at, label)
    missing = [m for m in final.values() if m not in buffer_of]
    if missing:
        raise ConversionError(f"{label}: no int8 tensor for {len(missing)} of the graph's matrices "
                              f"(a CPU graph template quantizes every matrix int8 per channel)")
    return _layout(model, buffer_of, shapes)


def _check_no_placeholder_left(model: schema.ModelT, graph: schema.SubGraphT, kind_at: dict[int, int],
                               label: str) -> None:
    """Refuse a placeholder litert-torch transformed (its scales no marker's, e.g. scaled by a
    folded constant): its weights cannot be streamed, and left as it is it would compute garbage."""
    for index, tensor in enumerate(graph.tensors or []):
        if index in kind_at or tensor.type != schema.TensorType.INT8 or len(tensor.shape) != 2:
            continue
        data = model.buffers[tensor.buffer].data
        if data is not None and len(data) and bool(np.all(np.asarray(data) == INT8_MAX)):
            name = tensor.name.decode(errors="replace") if isinstance(tensor.name, bytes) else tensor.name
            raise ConversionError(f"{label}: litert-torch transformed a placeholder matrix ({name[-80:]}), so its "
                                  "int8 weights cannot be streamed")


def streamable(model_config: Any) -> bool:
    """Whether the graph's matrices stay placeholders through litert-torch's export: a final logit
    soft cap (Gemma 2) is folded into the output matrix, so such graphs are exported whole."""
    return getattr(model_config, "final_logit_softcap", None) is None


def _own_tensor(model: schema.ModelT, graph: schema.SubGraphT, index: int, reuse: bool, matrix: int,
                buffer_of: dict[int, int], shapes: dict[int, tuple[int, int]]) -> int:
    """A tensor of its own for `matrix`: the template tensor itself when `reuse` (its first
    reader), else a copy; its scales `marker(matrix) / 127`, its buffer the matrix's."""
    template = graph.tensors[index]
    shape = tuple(int(n) for n in template.shape)
    if len(shape) != 2 or len(template.quantization.scale) != shape[0]:
        raise ConversionError(f"matrix {matrix} of the graph is not an [out, in] int8 matrix quantized per channel")
    if shapes.setdefault(matrix, (shape[0], shape[1])) != shape:
        raise ConversionError(f"matrix {matrix} of the graph appears as {shapes[matrix]} and {shape}")
    tensor = template if reuse else copy.copy(template)
    tensor.quantization = copy.copy(template.quantization)
    tensor.quantization.scale = np.full(shape[0], marker(matrix) / INT8_MAX, dtype=np.float32)
    if matrix not in buffer_of:
        fresh = template.buffer in buffer_of.values()
        buffer_of[matrix] = len(model.buffers) if fresh else template.buffer
        if fresh:
            model.buffers.append(schema.BufferT())
    tensor.buffer = buffer_of[matrix]
    if reuse:
        return index
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _layout(model: schema.ModelT, buffer_of: dict[int, int], shapes: dict[int, tuple[int, int]]) -> Unshared:
    """Pack the model with every matrix's buffer placed after the flatbuffer, in matrix order."""
    sizes = {buffer_of[m]: shapes[m][0] * shapes[m][1] for m in sorted(buffer_of)}
    for index, size in sizes.items():
        buffer = model.buffers[index]
        buffer.data, buffer.offset, buffer.size = None, _UNPLACED, size
    packed = _pack(model)
    position = roundup(len(packed), FILE_ALIGNMENT)
    for index, size in sizes.items():
        model.buffers[index].offset = position
        position = roundup(position + size, DATA_ALIGNMENT)
    flatbuffer = _pack(model)
    assert len(flatbuffer) == len(packed)  # offsets are fixed-size fields, all present both times
    return Unshared(flatbuffer, roundup(position, FILE_ALIGNMENT))


def _pack(model: schema.ModelT) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@dataclass
class _Slots:
    """Where one matrix lives in the model file: its data buffers and its scale vectors."""

    shape: tuple[int, int] | None = None
    data: set[tuple[int, int]] = field(default_factory=set)  # (file position, bytes)
    scales: set[int] = field(default_factory=set)  # file position of float32 [O]


def _buffer_position(buffer: schema.Buffer) -> int:
    if buffer.Offset():  # data outside the flatbuffer, from the file's start
        return int(buffer.Offset())
    return buffer._tab.Vector(buffer._tab.Offset(BUFFER_DATA_SLOT))


def find_matrices(data: bytes, count: int, label: str) -> list[_Slots]:
    """Locate the `count` marked int8 matrices of a model file; each must be found."""
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
                raise ConversionError(f"{label}: matrix {index} is not quantized per output channel")
            slot = slots[index]
            if slot.shape not in (None, shape):
                raise ConversionError(f"{label}: matrix {index} appears as {slot.shape} and {shape}")
            slot.shape = (shape[0], shape[1])
            buffer = model.Buffers(tensor.Buffer())
            slot.data.add((_buffer_position(buffer), shape[0] * shape[1]))
            slot.scales.add(quant._tab.Vector(quant._tab.Offset(QUANTIZATION_SCALE_SLOT)))
    missing = [str(k) for k, slot in enumerate(slots) if slot.shape is None]
    if missing:
        raise ConversionError(f"{label}: no int8 tensor for matrices {', '.join(missing)} (quantize int8 per channel)")
    return slots


def _stream_matrix(plan: ConversionPlan, name: str, rows: Rows, slot: _Slots, fd: int) -> None:
    """Quantize `rows` (stacked) into the matrix's buffers and scales."""
    assert slot.shape is not None
    height, cols = slot.shape
    shapes = [tuple(plan.source.info(source).shape) for source, _, _ in rows]
    if any(len(s) != 2 or s[1] != cols for s in shapes) or sum(stop - start for _, start, stop in rows) != height:
        raise ConversionError(f"{name}: the graph holds a [{height}, {cols}] matrix, the checkpoint gives "
                              f"{' + '.join(str(list(s)) for s in shapes)}")
    scales = np.empty(height, dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // cols)
    row = 0
    for source, first, end in rows:
        for start in range(first, end, step):
            stop = min(start + step, end)
            with plan.source.rows(source, start, stop) as chunk:
                if not bool(torch.isfinite(chunk).all()):
                    raise ConversionError(f"tensor {source} has NaN or Inf values (rows {start}-{stop - 1})")
                q, scale = quantize_rows(chunk)
            for position, _ in slot.data:
                pwrite_all(fd, q, position + (row + start - first) * cols)
            scales[row + start - first: row + stop - first] = scale
        row += end - first
    for position in slot.scales:
        pwrite_all(fd, scales, position)


def write_model(output: BinaryIO, plan: ConversionPlan, model: Unshared,
                matrices: Sequence[tuple[str, Rows]]) -> None:
    """Write the unshared model to `output` with matrix m's int8 weights and scales from its rows."""
    slots = find_matrices(model.flatbuffer, len(matrices), "the CPU graph")
    output.write(model.flatbuffer)
    output.truncate(model.file_size)
    output.flush()
    for (name, rows), slot in zip(matrices, slots):
        _stream_matrix(plan, name, rows, slot, output.fileno())
