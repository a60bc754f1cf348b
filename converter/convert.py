"""Run a conversion plan: stream every tensor from the checkpoint into the output files."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from . import files, quantize, tflite
from .checkpoint import checkpoint_files
from .config import ConversionConfig
from .errors import ConversionError
from .plan import QUANT_BITS, ConversionPlan, PlannedTensor, make_plan

CHUNK_ELEMENTS = 1 << 20  # ~1M weights a chunk (4 MB as float32): measured fastest on 2 cores
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
Progress = Callable[[int], None]
Encode = Callable[[torch.Tensor, torch.Tensor, int, int], None]  # (chunk, its band of the stage, start, stop)


@dataclass(frozen=True)
class ConversionResult:
    output: Path
    lora_output: Path | None
    tensors: int
    bytes_written: int


def rows_per_chunk(cols: int) -> int:
    return max(4, CHUNK_ELEMENTS // max(cols, 1) // 4 * 4)


def _check_finite(name: str, start: int, values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        row = start + int((~torch.isfinite(values)).nonzero()[0][0])
        raise ConversionError(f"tensor {name} has NaN or Inf values (row {row})")


def _stream_tiled(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter, name: str,
                  bytes_per_weight: float, encode: Encode, progress: Progress) -> None:
    """Stream a `[O, I]` tensor in row chunks into its tile4 layout, seen as `[I/4, O*4*bytes]`.

    Rows [o0, o1) of the source fill the column band [4*o0*bytes, 4*o1*bytes) of that view;
    bands are gathered in a staging buffer, its chunks encoded by WORKERS threads at once, and
    written in the background while the next stage fills.
    """
    rows, cols = item.shape
    band = int(4 * bytes_per_weight)  # bytes per source row in each of the I/4 tiled rows
    step = rows_per_chunk(cols)
    stage_rows = min(rows, max(step, tflite.STAGE_BYTES // (cols * band // 4) // step * step))
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="encode")
    try:
        for stage_start in range(0, rows, stage_rows):
            stage_stop = min(stage_start + stage_rows, rows)
            stage = writer.stage(cols // 4, (stage_stop - stage_start) * band)
            chunks = [(start, min(start + step, stage_stop)) for start in range(stage_start, stage_stop, step)]
            fill = partial(_encode_chunk, plan, item.source, encode, torch.from_numpy(stage), stage_start, band)
            for start, stop in pool.map(fill, chunks):
                progress(int((stop - start) * cols * bytes_per_weight))
            writer.write_stage(name, stage, stage_start * band)
    finally:  # after an error (a NaN, a signal) the chunks not yet started are dropped
        pool.shutdown(cancel_futures=True)


def _encode_chunk(plan: ConversionPlan, source: str, encode: Encode, stage: torch.Tensor, stage_start: int,
                  band: int, rows: tuple[int, int]) -> tuple[int, int]:
    """Read rows [start, stop) of `source` and encode them into their column band of `stage`."""
    start, stop = rows
    with plan.source.rows(source, start, stop) as chunk:
        encode(chunk, stage[:, (start - stage_start) * band:(stop - stage_start) * band], start, stop)
    return rows


def write_quantized(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter,
                    progress: Progress) -> None:
    bits = QUANT_BITS[item.encoding]
    rows, cols = item.shape
    name = next(s.name for s in item.outputs if not s.name.endswith((".sum_i", "_quantized_scale")))
    scales, sums = torch.empty(rows), torch.empty(rows, dtype=torch.int32)

    def encode(chunk: torch.Tensor, tiled: torch.Tensor, start: int, stop: int) -> None:
        quantize.quantize_rows(chunk, bits, tiled, scales[start:stop], sums[start:stop])
        _check_finite(item.source, start, scales[start:stop])

    _stream_tiled(plan, item, writer, name, bits / 8, encode, progress)
    writer.write(f"{name}_quantized_scale", scales.numpy())
    writer.write(f"{name}.sum_i", sums.numpy())
    progress(scales.numel() * 4 + sums.numel() * 4)  # the plan counts them in the item's bytes


def write_float_weights(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter,
                        progress: Progress) -> None:
    spec = item.outputs[0]
    dtype = torch.float16 if spec.type == tflite.FLOAT16 else torch.float32

    def encode(chunk: torch.Tensor, tiled: torch.Tensor, start: int, stop: int) -> None:
        values = chunk.to(torch.float32)
        _check_finite(item.source, start, values)
        tiled.copy_(quantize.tile_float(values, dtype).view(torch.uint8))

    _stream_tiled(plan, item, writer, spec.name, dtype.itemsize, encode, progress)


def write_raw_float32(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter,
                      progress: Progress) -> None:
    spec = item.outputs[0]
    with plan.source.rows(item.source, 0, 1) as chunk:
        values = chunk.to(torch.float32).reshape(-1)
    _check_finite(item.source, 0, values)
    writer.write(spec.name, values.numpy())
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
    matrix *= item.scale
    if item.lora_rule_transposed:
        # MediaPipe 0.10.21 reinterprets the transposed buffer instead of transposing.
        matrix = matrix.t().contiguous().reshape(rows, cols)
    if item.lora_transposed_back:
        matrix = matrix.t().contiguous()
    return matrix


def write_lora(plan: ConversionPlan, item: PlannedTensor, writer: tflite.WeightFileWriter, progress: Progress) -> None:
    spec = item.outputs[0]
    rows, cols = item.shape
    dtype = torch.float16 if spec.nbytes == rows * cols * 2 else torch.float32  # the width the plan chose
    writer.write(spec.name, quantize.tile_float(lora_half(plan, item), dtype).numpy())
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


def input_paths(config: ConversionConfig) -> list[tuple[str, Path | None]]:
    """Every file a conversion reads, by option: checkpoint files (each shard), its config.json, the
    tokenizer (a folder's files), the adapter's files and its adapter_config.json."""
    checkpoint = Path(config.input_ckpt)
    inputs: list[tuple[str, Path | None]] = [("--input-ckpt", checkpoint)]
    inputs += [("--input-ckpt", file) for file in checkpoint_files(checkpoint, config.ckpt_format)]
    inputs += [("--input-ckpt", (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"),
               ("--vocab-model-file", Path(config.vocab_model_file))]
    if config.lora_ckpt is not None:
        adapter = Path(config.lora_ckpt)
        inputs += [("--lora-ckpt", adapter), ("--lora-ckpt", (adapter if adapter.is_dir() else adapter.parent)
                                                / "adapter_config.json")]
    return inputs


def check_outputs(plan: ConversionPlan) -> Path | None:
    """Check the output paths (writable, none of them an input) before anything is written; the LoRA
    file's path when the plan writes one."""
    config = plan.config
    lora_path = config.lora_output_path if plan.lora is not None else None
    outputs = [("--output-tflite-file", config.output_path)]
    outputs += [("--lora-output-tflite-file", lora_path)] if lora_path is not None else []
    for option, path in outputs:
        files.check_output(path, option)
    files.refuse_overwrite(outputs, input_paths(config))
    return lora_path


def execute(plan: ConversionPlan, progress: Progress = lambda n: None) -> ConversionResult:
    """Write the base file and, when planned, the LoRA file; both appear only if both succeed."""
    config = plan.config
    if config.backend == "cpu":
        from .cpu.convert import execute_cpu  # litert-torch is imported only for the CPU backend

        return execute_cpu(plan, progress)
    lora_path = check_outputs(plan)
    base = file_writer(plan, plan.base, config.output_path, None)
    written = base.layout.file_size
    with base:
        write_items(plan, plan.base, base, progress)
        if lora_path is not None:
            lora = file_writer(plan, plan.lora, lora_path, config.lora_rank)
            with lora:
                write_items(plan, plan.lora, lora, progress)
            written += lora.layout.file_size
    tensors = sum(len(i.outputs) for i in plan.base) + sum(len(i.outputs) for i in plan.lora or [])
    return ConversionResult(config.output_path, lora_path if plan.lora is not None else None, tensors, written)


def convert(config: ConversionConfig, progress: Progress = lambda n: None) -> ConversionResult:
    """Convert a checkpoint (and LoRA adapter) as `config` says; raises ConversionError on bad input."""
    plan = make_plan(config)
    try:
        return execute(plan, progress)
    finally:
        plan.close()
