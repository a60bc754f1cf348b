"""Run a conversion plan: stream every tensor from the checkpoint into the output files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import quantize, tflite
from .config import ConversionConfig
from .errors import ConversionError
from .plan import QUANT_BITS, ConversionPlan, PlannedTensor, make_plan

CHUNK_ELEMENTS = 1 << 20  # ~1M weights a chunk (4 MB as float32): measured fastest on 2 cores
RELEASE_BYTES = 64 << 20  # drop written output pages from this process this often
Progress = Callable[[int], None]


@dataclass(frozen=True)
class ConversionResult:
    output: Path
    lora_output: Path | None
    tensors: int
    bytes_written: int


def rows_per_chunk(cols: int) -> int:
    return max(4, CHUNK_ELEMENTS // max(cols, 1) // 4 * 4)


def _as_tensor(view: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(view)


def _check_finite(name: str, start: int, values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        row = start + int((~torch.isfinite(values)).nonzero()[0][0])
        raise ConversionError(f"tensor {name} has NaN or Inf values (row {row})")


def write_quantized(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter,
                    progress: Progress) -> None:
    bits = QUANT_BITS[item.encoding]
    rows, cols = item.shape
    name = next(s.name for s in item.outputs if not s.name.endswith((".sum_i", "_quantized_scale")))
    # Seen as [I/4, O*bits/2] bytes, row chunk [o0, o1) is the column band [o0*bits/2, o1*bits/2).
    data = _as_tensor(writer.view(name)).view(cols // 4, -1)
    scales = _as_tensor(writer.view(f"{name}_quantized_scale")).view(torch.float32)
    sums = _as_tensor(writer.view(f"{name}.sum_i")).view(torch.int32)
    band = bits // 2
    step = rows_per_chunk(cols)
    if rows * cols * bits // 8 > RELEASE_BYTES:
        step = max(step, tflite.PAGE // band)  # whole output pages per chunk: released pages stay done
    quantizer = quantize.RowQuantizer(bits, step, cols)
    unreleased = 0
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        with plan.source.rows(item.source, start, stop) as chunk:
            quantizer(chunk, data[:, start * band: stop * band], scales[start:stop], sums[start:stop])
        _check_finite(item.source, start, scales[start:stop])
        written = (stop - start) * cols * bits // 8
        progress(written)
        unreleased += written
        if unreleased >= RELEASE_BYTES:
            writer.release(name)
            unreleased = 0
    for spec in item.outputs:
        writer.release(spec.name)


def write_float_weights(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter,
                        progress: Progress) -> None:
    spec = item.outputs[0]
    dtype = torch.float16 if spec.type == tflite.FLOAT16 else torch.float32
    rows, cols = item.shape
    data = _as_tensor(writer.view(spec.name)).view(dtype).view(cols // 4, -1)
    step = rows_per_chunk(cols)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        with plan.source.rows(item.source, start, stop) as chunk:
            values = chunk.to(torch.float32)
        _check_finite(item.source, start, values)
        data[:, start * 4: stop * 4] = quantize.tile_float(values, dtype)
        progress((stop - start) * cols * dtype.itemsize)
    writer.release(spec.name)


def write_raw_float32(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter,
                      progress: Progress) -> None:
    spec = item.outputs[0]
    with plan.source.rows(item.source, 0, 1) as chunk:
        values = chunk.to(torch.float32).reshape(-1)
    _check_finite(item.source, 0, values)
    _as_tensor(writer.view(spec.name)).view(torch.float32)[:] = values
    progress(spec.nbytes)


def lora_half(plan: ConversionPlan, item: PlannedTensor) -> torch.Tensor:
    """A LoRA half as the float32 matrix to store: scaled (B), zero-padded to the rank, compat-reshaped."""
    rows, cols = item.shape
    matrix = torch.zeros(rows, cols)
    if item.source is not None:
        with plan.adapter.source.rows(item.source, 0, plan.adapter.source.info(item.source).shape[0]) as chunk:
            values = chunk.to(torch.float32)
        _check_finite(item.source, 0, values)
        matrix[: values.shape[0], : values.shape[1]] = values
    if item.encoding == "lora-B" and plan.config.effective_lora_scaling == "peft":
        matrix *= plan.adapter.peft_scale
    if item.lora_rule_transposed:
        # MediaPipe 0.10.21 reinterprets the transposed buffer instead of transposing.
        matrix = matrix.t().contiguous().reshape(rows, cols)
    return matrix


def write_lora(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter, progress: Progress) -> None:
    spec = item.outputs[0]
    tiled = quantize.tile_float(lora_half(plan, item), torch.float16)
    _as_tensor(writer.view(spec.name)).view(torch.float16)[:] = tiled.reshape(-1)
    progress(spec.nbytes)


WRITERS = {
    "int8": write_quantized,
    "int4": write_quantized,
    "fp16": write_float_weights,
    "fp32": write_float_weights,
    "float32": write_raw_float32,
    "lora-A": write_lora,
    "lora-B": write_lora,
}


def file_writer(plan: ConversionPlan, items: list[PlannedTensor], path: Path,
                lora_rank: int | None) -> tflite.WeightFileWriter:
    specs = [spec for item in items for spec in item.outputs]
    return tflite.WeightFileWriter(path, plan.model_type.name, specs, plan.metadata(lora_rank))


def write_items(plan: ConversionPlan, items: list[PlannedTensor], writer: tflite.WeightFileWriter,
                progress: Progress) -> None:
    for item in items:
        WRITERS[item.encoding](plan, item, writer, progress)


def execute(plan: ConversionPlan, progress: Progress = lambda n: None) -> ConversionResult:
    """Write the base file and, when planned, the LoRA file; both appear only if both succeed."""
    config = plan.config
    lora_path = config.lora_output_path
    if plan.lora is not None and lora_path.resolve() == config.output_path.resolve():
        raise ConversionError("--lora-output-tflite-file must differ from --output-tflite-file")
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    base = file_writer(plan, plan.base, config.output_path, None)
    written = base.layout.file_size
    try:
        with base:
            write_items(plan, plan.base, base, progress)
            if plan.lora is not None:
                lora = file_writer(plan, plan.lora, lora_path, config.lora_rank)
                with lora:
                    write_items(plan, plan.lora, lora, progress)
                written += lora.layout.file_size
    except OSError as exc:
        raise ConversionError(f"writing {exc.filename or config.output_path}: {exc.strerror}") from None
    tensors = sum(len(i.outputs) for i in plan.base) + sum(len(i.outputs) for i in plan.lora or [])
    return ConversionResult(config.output_path, lora_path if plan.lora is not None else None, tensors, written)


def convert(config: ConversionConfig, progress: Progress = lambda n: None) -> ConversionResult:
    """Convert a checkpoint (and LoRA adapter) as `config` says; raises ConversionError on bad input."""
    plan = make_plan(config)
    try:
        return execute(plan, progress)
    finally:
        plan.close()
