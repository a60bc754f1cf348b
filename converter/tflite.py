"""The MediaPipe GPU weights file: a TFLite flatbuffer whose tensor data lives outside it.

Layout (what MediaPipe's GPU converter writes and its runtimes load):
- Model: version 3, one subgraph named after the model type, buffers, metadata.
- Buffer 0 is empty; metadata blobs take the next buffers; tensor k then uses the buffer
  after them. Every non-empty buffer has `offset`/`size` and no inline data.
- Each tensor is 1-D with `shape = [byte size]`, `has_rank = true`, and a `type` only when
  it is not FLOAT32.
- Data starts at `roundup(flatbuffer size, 64 KiB)`, each buffer at a 256-byte boundary, in
  buffer order; the file is zero-padded to a multiple of 64 KiB (and to at least 1 MiB).
Tables are built in the order (and with the field order) of flatc's C++ object API, which
is what makes the flatbuffer region itself byte-identical to MediaPipe's.

The writer sizes the file first, then writes each tensor's bytes (whole, or as column blocks of
the tiled layout, in a background thread from staging buffers) at their final offsets as a
converter streams them. It writes to a temporary name and renames on success, so a failure
never leaves a partial file.
"""
from __future__ import annotations

import os
import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import numpy as np
import torch
from ai_edge_litert import schema_py_generated as schema

from . import quantize
from .errors import ConversionError
from .files import atomic_output, pwrite_all, start_writeback
from .proto import llm_params_pb2

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
DATA_ALIGNMENT = 256
FILE_ALIGNMENT = 65536
# Runtimes map the first 1 MiB of a weights file; smaller files (tiny models, small LoRAs) fail
# to load, so files are zero-padded to at least this size. Real models are far larger.
MIN_FILE_SIZE = 1 << 20
# Each tensor's shape is `[byte size]`, and TFLite shapes are int32: no tensor can be 2 GiB or more.
MAX_TENSOR_BYTES = 2**31 - 1
STAGE_BYTES = 16 << 20  # a staging buffer: large pwrites, and few enough to keep memory flat
STAGES = 2  # one being filled while the other is written

FLOAT32 = schema.TensorType.FLOAT32
FLOAT16 = schema.TensorType.FLOAT16
INT32 = schema.TensorType.INT32
INT8 = schema.TensorType.INT8
INT4 = schema.TensorType.INT4
TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

# Metadata names MediaPipe's runtimes look for.
LLM_PARAMETERS = "odml.infra.proto.LlmParameters"
SPM_VOCAB_MODEL = "spm_vocab_model"
LLM_MODEL_TYPE = "odml.infra.LlmModelType"
BACKEND = "backend"
LORA_RANK = "lora_rank"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, TFLite type and size in bytes."""

    name: str
    type: int
    nbytes: int

    def __post_init__(self) -> None:
        if self.nbytes > MAX_TENSOR_BYTES:
            raise ConversionError(
                f"output tensor {self.name} would hold {self.nbytes:,} bytes, but a weights file gives each tensor "
                f"its byte size as an int32 TFLite shape (at most {MAX_TENSOR_BYTES:,}, 2 GiB): use a smaller "
                f"--quantization (fp16, int8 or int4)"
            )


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as found in a file: where its bytes are."""

    name: str
    type: int
    offset: int
    nbytes: int


# A metadata value is either a blob (stored in its own buffer) or an int stored in the
# metadata's buffer field itself (MediaPipe's way for the model type and LoRA rank).
MetadataValue = bytes | int


def roundup(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _build_flatbuffer(
    subgraph_name: str, tensors: list[TensorSpec], metadata: list[tuple[str, MetadataValue]],
    blob_offsets: list[int], tensor_offsets: list[int],
) -> bytes:
    """Serialize the model table; objects are created in the order MediaPipe's C++ creates them."""
    builder = flatbuffers.Builder(1024 * 64)
    buffer_tables = [_buffer(builder, 0, 0)]
    metadata_tables = []
    blobs = iter(blob_offsets)
    for key, value in metadata:
        if isinstance(value, bytes):
            buffer_tables.append(_buffer(builder, next(blobs), len(value)))
            value = len(buffer_tables) - 1
        name = builder.CreateString(key)
        schema.MetadataStart(builder)
        schema.MetadataAddBuffer(builder, value)
        schema.MetadataAddName(builder, name)
        metadata_tables.append(schema.MetadataEnd(builder))

    tensor_tables = []
    for spec, offset in zip(tensors, tensor_offsets):
        buffer_tables.append(_buffer(builder, offset, spec.nbytes))
        shape = builder.CreateNumpyVector(np.array([spec.nbytes], dtype=np.int32))
        name = builder.CreateString(spec.name)
        schema.TensorStart(builder)
        schema.TensorAddName(builder, name)
        schema.TensorAddBuffer(builder, len(buffer_tables) - 1)
        schema.TensorAddShape(builder, shape)
        schema.TensorAddHasRank(builder, True)
        if spec.type != FLOAT32:
            schema.TensorAddType(builder, spec.type)
        tensor_tables.append(schema.TensorEnd(builder))

    tensor_vector = _offset_vector(builder, schema.SubGraphStartTensorsVector, tensor_tables)
    graph_name = builder.CreateString(subgraph_name)
    schema.SubGraphStart(builder)
    schema.SubGraphAddName(builder, graph_name)
    schema.SubGraphAddTensors(builder, tensor_vector)
    subgraphs = _offset_vector(builder, schema.ModelStartSubgraphsVector, [schema.SubGraphEnd(builder)])
    buffers = _offset_vector(builder, schema.ModelStartBuffersVector, buffer_tables)
    metadata_vector = _offset_vector(builder, schema.ModelStartMetadataVector, metadata_tables)

    schema.ModelStart(builder)
    schema.ModelAddMetadata(builder, metadata_vector)
    schema.ModelAddBuffers(builder, buffers)
    schema.ModelAddSubgraphs(builder, subgraphs)
    schema.ModelAddVersion(builder, SCHEMA_VERSION)
    builder.Finish(schema.ModelEnd(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _buffer(builder: flatbuffers.Builder, offset: int, size: int) -> int:
    """A Buffer table pointing at external data (or the empty buffer when size is 0)."""
    schema.BufferStart(builder)
    if size:
        schema.BufferAddSize(builder, size)
        schema.BufferAddOffset(builder, offset)
    return schema.BufferEnd(builder)


def _offset_vector(builder: flatbuffers.Builder, start, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


@dataclass(frozen=True)
class Layout:
    flatbuffer: bytes
    blob_offsets: list[int]
    tensor_offsets: list[int]
    file_size: int


def plan_layout(subgraph_name: str, tensors: list[TensorSpec], metadata: list[tuple[str, MetadataValue]]) -> Layout:
    """Place the flatbuffer and every buffer; the flatbuffer's size does not depend on offsets."""
    blobs = [v for _, v in metadata if isinstance(v, bytes)]
    sizes = [len(b) for b in blobs] + [t.nbytes for t in tensors]

    def offsets_from(first: int) -> list[int]:
        result, position = [], first
        for size in sizes:
            result.append(position)
            position = roundup(position + size, DATA_ALIGNMENT)
        return result

    first = FILE_ALIGNMENT
    while True:
        offsets = offsets_from(first)
        flatbuffer = _build_flatbuffer(subgraph_name, tensors, metadata, offsets[: len(blobs)], offsets[len(blobs):])
        needed = roundup(len(flatbuffer), FILE_ALIGNMENT)
        if needed == first:
            break
        first = needed
    end = offsets[-1] + sizes[-1] if sizes else first
    file_size = max(roundup(end, FILE_ALIGNMENT), MIN_FILE_SIZE)
    return Layout(flatbuffer, offsets[: len(blobs)], offsets[len(blobs):], file_size)


class WeightFileWriter:
    """Streams tensors into a new weights file; use as a context manager.

    The file is sized and its flatbuffer written first; tensor bytes then go straight to their
    final offsets with `pwrite` (nothing of the output is mapped into this process), either at
    once (`write`) or, for column blocks filled in a `stage` buffer, by a background thread
    (`write_stage`) while the caller fills the next. Once all of a tensor's bytes are written, their
    write to disk starts (`files.start_writeback`), so the sync before the rename finds little left.
    On a clean exit the pending writes finish and the temporary file is renamed over `path`; on an
    exception it is removed.
    """

    def __init__(self, path: Path, subgraph_name: str, tensors: list[TensorSpec],
                 metadata: list[tuple[str, MetadataValue]]):
        self.path = Path(path)
        self.layout = plan_layout(subgraph_name, tensors, metadata)
        self._specs = {spec.name: (spec, offset) for spec, offset in zip(tensors, self.layout.tensor_offsets)}
        if len(self._specs) != len(tensors):
            raise ConversionError(f"{path}: duplicate tensor names in the output plan")
        self._blobs = [v for _, v in metadata if isinstance(v, bytes)]
        self._unwritten = {spec.name: spec.nbytes for spec in tensors}
        self._counting = threading.Lock()  # tensors are written from the caller's and the background thread
        self._fd: int | None = None
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._buffers = 0
        self._pending: list[Future] = []

    def __enter__(self) -> "WeightFileWriter":
        with ExitStack() as stack:  # a failure here (disk full) still removes the temporary file
            self._fd = stack.enter_context(atomic_output(self.path)).fileno()
            os.ftruncate(self._fd, self.layout.file_size)
            self._pwrite(self.layout.flatbuffer, 0)
            for blob, offset in zip(self._blobs, self.layout.blob_offsets):
                self._pwrite(blob, offset)
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pwrite")
            self._stack = stack.pop_all()
        return self

    def _pwrite(self, data, offset: int) -> None:
        pwrite_all(self._fd, data, offset)

    def write(self, name: str, data: np.ndarray, start: int = 0) -> None:
        """Write contiguous bytes into tensor `name`, `start` bytes into it."""
        spec, offset = self._specs[name]
        if start + data.nbytes > spec.nbytes:
            raise ValueError(f"{name}: {data.nbytes} bytes at {start} overflow its {spec.nbytes}")
        self._pwrite(np.ascontiguousarray(data), offset + start)
        self._written(name, data.nbytes)

    def write_columns(self, name: str, block: np.ndarray, column: int) -> None:
        """Write a 2-D byte block into tensor `name` seen as rows of equal length, from byte `column`.

        Row k of the block lands at `k * row_length + column`, where the tensor has as many rows
        as the block; a block spanning whole rows is written in one call.
        """
        spec, offset = self._specs[name]
        rows, width = block.shape
        row_length = spec.nbytes // rows
        if column == 0 and width == row_length and block.flags.c_contiguous:
            self._pwrite(block, offset)
        else:  # one pwrite a row, of slices of one flat view (a row's own array costs more than its write)
            flat = memoryview(np.ascontiguousarray(block)).cast("B")
            for k in range(rows):
                self._pwrite(flat[k * width:(k + 1) * width], offset + k * row_length + column)
        self._written(name, block.nbytes)

    def _written(self, name: str, nbytes: int) -> None:
        """Count `nbytes` of tensor `name` as written; start its writeback once all are."""
        with self._counting:
            self._unwritten[name] -= nbytes
            complete = self._unwritten[name] == 0
        if complete:
            spec, offset = self._specs[name]
            start_writeback(self._fd, offset, spec.nbytes)

    def stage(self, rows: int, width: int) -> np.ndarray:
        """A `[rows, width]` byte buffer to fill and hand to `write_stage`; waits while all
        STAGES buffers are being written."""
        self._raise_failed()
        if rows * width > STAGE_BYTES:  # a single row wider than a stage: a one-off buffer
            return np.empty((rows, width), np.uint8)
        if self._free.empty() and self._buffers < STAGES:
            self._buffers += 1
            self._free.put(np.empty(STAGE_BYTES, np.uint8))
        return self._free.get()[: rows * width].reshape(rows, width)

    def write_stage(self, name: str, block: np.ndarray, column: int) -> None:
        """`write_columns` of a `stage` buffer, in the background; the buffer is reused after."""
        self._raise_failed()
        owner = block
        while owner.base is not None:
            owner = owner.base
        self._pending.append(self._background.submit(self._write_stage, name, block, column, owner))

    def _write_stage(self, name: str, block: np.ndarray, column: int, owner: np.ndarray) -> None:
        try:
            self.write_columns(name, block, column)
        finally:
            if owner.nbytes == STAGE_BYTES:
                self._free.put(owner)

    def _raise_failed(self) -> None:
        """Re-raise the error of a finished background write (disk full, ...), if any."""
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def __exit__(self, exc_type, exc, tb) -> None:
        # No write may outlive the file; after an error, writes not yet started are dropped.
        self._background.shutdown(wait=True, cancel_futures=exc is not None)
        if exc is None:
            try:
                while self._pending:
                    self._pending.pop(0).result()
            except BaseException as error:  # the temporary file goes, and an OSError becomes one line
                self._stack.__exit__(type(error), error, error.__traceback__)
                raise
        self._stack.__exit__(exc_type, exc, tb)


# Field numbers in the TFLite schema (schema.fbs) of what the reader needs; the writer uses the
# generated builders, and the round-trip tests check both agree.
MODEL_SUBGRAPHS, MODEL_BUFFERS, MODEL_METADATA = 2, 4, 6
SUBGRAPH_TENSORS, SUBGRAPH_NAME = 0, 4
TENSOR_TYPE, TENSOR_BUFFER, TENSOR_NAME = 1, 2, 3
BUFFER_OFFSET, BUFFER_SIZE = 1, 2
METADATA_NAME, METADATA_BUFFER = 0, 1
MAX_ENTRIES = 1 << 20  # tensors, buffers or metadata in one file: real models have a few thousand
MAX_NAME = 1 << 16
MAX_METADATA = 256 << 20  # a blob (tokenizer, parameters) read into memory: real ones take a few MB


class _FlatReader:
    """Flatbuffer tables read with every position checked against the file's size, so a corrupt or
    hostile file ends in one ConversionError, never an IndexError, a struct.error, a read of
    another part of the file or a huge allocation (the flatbuffers package trusts every offset)."""

    def __init__(self, data: np.ndarray, path: Path):
        self.data, self.path = memoryview(data).cast("B"), path

    def fail(self, what: str) -> ConversionError:
        return ConversionError(f"{self.path}: corrupt TFLite weights file ({what})")

    def number(self, fmt: str, position: int) -> int:
        size = struct.calcsize(fmt)
        if position < 0 or position + size > len(self.data):
            raise self.fail(f"an offset points to byte {position}, outside its {len(self.data)} bytes")
        return struct.unpack_from(fmt, self.data, position)[0]

    def table(self, position: int) -> tuple[int, int, int]:
        """A table at `position`: (position, its vtable's position, the vtable's size)."""
        vtable = position - self.number("<i", position)
        size = self.number("<H", vtable)
        if size < 4 or size % 2:
            raise self.fail(f"a table at byte {position} has a vtable of {size} bytes")
        return position, vtable, size

    def field(self, table: tuple[int, int, int], slot: int) -> int | None:
        """The position of a table's field, or None when it is absent (its default)."""
        position, vtable, size = table
        entry = 4 + 2 * slot
        offset = self.number("<H", vtable + entry) if entry + 2 <= size else 0
        return position + offset if offset else None

    def scalar(self, table: tuple[int, int, int], slot: int, fmt: str) -> int:
        position = self.field(table, slot)
        return 0 if position is None else self.number(fmt, position)

    def target(self, table: tuple[int, int, int], slot: int) -> int | None:
        """Where a table's offset field (a table, vector or string) points."""
        position = self.field(table, slot)
        return None if position is None else position + self.number("<I", position)

    def tables(self, table: tuple[int, int, int], slot: int, what: str) -> list[tuple[int, int, int]]:
        """A vector of tables, its length checked against the file and MAX_ENTRIES."""
        start = self.target(table, slot)
        if start is None:
            return []
        count = self.number("<I", start)
        if count > MAX_ENTRIES or start + 4 + 4 * count > len(self.data):
            raise self.fail(f"the {what} list claims {count} entries")
        elements = (start + 4 + 4 * i for i in range(count))
        return [self.table(element + self.number("<I", element)) for element in elements]

    def string(self, table: tuple[int, int, int], slot: int, what: str) -> str:
        start = self.target(table, slot)
        if start is None:
            return ""
        length = self.number("<I", start)
        if length > MAX_NAME or start + 4 + length > len(self.data):
            raise self.fail(f"a {what} claims {length} bytes")
        try:
            text = bytes(self.data[start + 4: start + 4 + length]).decode()
        except UnicodeDecodeError:
            raise self.fail(f"a {what} is not UTF-8") from None
        if not text.isprintable():  # names end up in one-line messages
            raise self.fail(f"a {what} holds control characters")
        return text


class WeightFile:
    """Reads a GPU weights file (ours or MediaPipe's): tensors, metadata, raw bytes."""

    def __init__(self, path: Path | str, offset: int = 0, size: int | None = None):
        """Read the file at `path`, or the one embedded at `offset` (`size` bytes) in a bundle."""
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset,
                                   shape=None if size is None else (size,))
        except (OSError, ValueError) as exc:
            raise ConversionError(f"{self.path}: cannot read ({exc})") from None
        if len(self._data) < 8 or bytes(self._data[4:8]) != FILE_IDENTIFIER:
            raise ConversionError(f"{self.path}: not a TFLite weights file (no TFL3 identifier)")
        reader = _FlatReader(self._data, self.path)
        model = reader.table(reader.number("<I", 0))
        buffers = [(reader.scalar(b, BUFFER_OFFSET, "<Q"), reader.scalar(b, BUFFER_SIZE, "<Q"))
                   for b in reader.tables(model, MODEL_BUFFERS, "buffer")]
        for buffer_offset, buffer_size in buffers:
            if buffer_offset + buffer_size > len(self._data):
                raise ConversionError(f"{self.path}: a buffer of {buffer_size} bytes at {buffer_offset} lies beyond "
                                      f"the end of the file ({len(self._data)} bytes; truncated?)")
        # Bytes before the first data buffer: the flatbuffer plus its zero padding.
        self.data_start = min((o for o, n in buffers if n), default=len(self._data))
        graphs = reader.tables(model, MODEL_SUBGRAPHS, "subgraph")
        if not graphs:
            raise reader.fail("no subgraph")
        self.subgraph_name = reader.string(graphs[0], SUBGRAPH_NAME, "subgraph name")

        def buffer(index: int, what: str) -> tuple[int, int]:
            if index >= len(buffers):
                raise reader.fail(f"{what} uses buffer {index} of {len(buffers)}")
            return buffers[index]

        self.tensors: dict[str, TensorEntry] = {}
        for table in reader.tables(graphs[0], SUBGRAPH_TENSORS, "tensor"):
            name = reader.string(table, TENSOR_NAME, "tensor name")
            if name in self.tensors:
                raise reader.fail(f"tensor {name} appears twice")
            place = buffer(reader.scalar(table, TENSOR_BUFFER, "<I"), f"tensor {name}")
            self.tensors[name] = TensorEntry(name, reader.scalar(table, TENSOR_TYPE, "<b"), *place)
        self.metadata: dict[str, MetadataValue] = {}
        for table in reader.tables(model, MODEL_METADATA, "metadata"):
            key = reader.string(table, METADATA_NAME, "metadata name")
            index = reader.scalar(table, METADATA_BUFFER, "<I")
            if key in (LLM_MODEL_TYPE, LORA_RANK):
                self.metadata[key] = index
            else:
                start, length = buffer(index, f"metadata {key}")
                if length > MAX_METADATA:
                    raise reader.fail(f"metadata {key} claims {length} bytes")
                self.metadata[key] = bytes(self._data[start: start + length])

    def entry(self, name: str) -> TensorEntry:
        """A tensor by name; a ConversionError naming it when the file has none (e.g. its parameters
        claim more layers than it holds)."""
        entry = self.tensors.get(name)
        if entry is None:
            raise ConversionError(f"{self.path}: no tensor {name} (its parameters need it: a truncated file, "
                                  f"or one of another model?)")
        return entry

    @property
    def parameters(self) -> llm_params_pb2.LlmParameters:
        """The LlmParameters stored in the file's metadata."""
        blob = self.metadata.get(LLM_PARAMETERS)
        if not isinstance(blob, bytes):
            raise ConversionError(f"{self.path}: no {LLM_PARAMETERS} metadata; not an LLM weights file")
        try:
            return llm_params_pb2.LlmParameters.FromString(blob)
        except Exception:  # protobuf's DecodeError and friends
            raise ConversionError(f"{self.path}: {LLM_PARAMETERS} metadata does not parse") from None

    @property
    def lora_rank(self) -> int | None:
        """The LoRA rank of a LoRA weights file; None for a base model."""
        return self.metadata.get(LORA_RANK)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor (read-only, memory-mapped)."""
        entry = self.entry(name)
        return self._data[entry.offset: entry.offset + entry.nbytes]

    def matrix(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A stored `[rows, cols]` matrix as float32: int8/int4 dequantized with its scales, float
        (and fp16 LoRA, stored with the FLOAT32 type but 2 bytes per value) untiled."""
        entry = self.entry(name)
        if rows <= 0 or cols <= 0 or rows % quantize.TILE or cols % quantize.TILE:
            raise ConversionError(f"{self.path}: tensor {name} cannot be a [{rows}, {cols}] matrix: the GPU layout "
                                  f"tiles 4x4 (the file's parameters give these sizes)")
        if entry.type in (INT8, INT4):
            bits = 8 if entry.type == INT8 else 4
            scale = self.entry(f"{name}_quantized_scale")
            if entry.nbytes * 8 != rows * cols * bits or scale.nbytes != rows * 4:
                raise ConversionError(f"{self.path}: tensor {name} has {entry.nbytes} bytes and {scale.nbytes} "
                                      f"bytes of scales, not an int{bits} [{rows}, {cols}] matrix")
            data = torch.from_numpy(np.array(self.raw(name)))
            scales = torch.from_numpy(np.array(self.raw(scale.name))).view(torch.float32)
            return quantize.dequantize_tiled(data, scales, bits, rows, cols)
        itemsize = entry.nbytes // (rows * cols)
        if entry.nbytes != rows * cols * itemsize or itemsize not in (2, 4):
            raise ConversionError(f"{self.path}: tensor {name} has {entry.nbytes} bytes, not a [{rows}, {cols}] matrix")
        values = torch.from_numpy(np.array(self.raw(name))).view(torch.float16 if itemsize == 2 else torch.float32)
        return quantize.untile(values, rows, cols).to(torch.float32)

    def vector(self, name: str, size: int | None = None) -> torch.Tensor:
        """A raw float32 tensor (norm scales, biases), checked to hold `size` values when given."""
        nbytes = self.entry(name).nbytes
        if nbytes % 4 or (size is not None and nbytes != size * 4):
            raise ConversionError(f"{self.path}: tensor {name} has {nbytes} bytes, not "
                                  f"{'whole' if size is None else size} float32 values")
        return torch.from_numpy(np.array(self.raw(name))).view(torch.float32)

