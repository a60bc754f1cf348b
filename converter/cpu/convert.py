"""Run a `--backend cpu` plan: the graph (int8: streamed into a cached template), then the LoRA file."""
from __future__ import annotations

import io
import struct
from typing import Any, BinaryIO

from .. import files
from ..convert import ConversionResult, Progress, check_outputs
from ..errors import ConversionError
from ..plan import ConversionPlan
from . import cache, export, graph, lora, stream

TEMPLATE = "the cached CPU graph template"


def _template(plan: ConversionPlan, model_config: Any, lora_inputs: dict | None) -> cache.Template:
    """litert-torch's export of the model with marker placeholders (see stream.py)."""
    model = graph.build_model(plan, model_config)
    kinds = stream.place_markers(plan, model, model_config)
    sample = None
    if lora_inputs is not None:
        model, sample = graph.with_lora(model), export.lora_sample(lora_inputs, plan.dims.num_layers)
    built = io.BytesIO()
    with stream.distinct_constants():
        export.export(model, model_config, built, plan.config.output_path.parent, "int8", plan.config.cpu_prefill_length,
                      plan.config.cpu_kv_cache_size, sample)
    return cache.Template(built.getvalue(), kinds)


def write_streamed(plan: ConversionPlan, model_config: Any, output: BinaryIO, lora_inputs: dict | None) -> None:
    """The int8 graph: a template from the cache (or built, and cached), unshared, weights streamed in."""
    key, where = cache.graph_key(plan, model_config), cache.folder()
    template = cache.load(where, key) if plan.config.graph_cache else None
    unshared = None
    if template is not None:
        try:
            unshared = stream.unshare(template.data, template.kinds, plan.dims.num_layers, TEMPLATE)
        except (ConversionError, ValueError, IndexError, TypeError, struct.error):  # damaged, yet its hash matched
            unshared = None
    if unshared is None:
        template = _template(plan, model_config, lora_inputs)
        unshared = stream.unshare(template.data, template.kinds, plan.dims.num_layers, "litert-torch's CPU graph")
        if plan.config.graph_cache:
            cache.store(where, key, template)
    assert template is not None
    stream.write_model(output, plan, unshared, stream.matrix_rows(plan, model_config, template.kinds))


def execute_cpu(plan: ConversionPlan, progress: Progress = lambda n: None) -> ConversionResult:
    """Write the CPU graph and, with an adapter, its LoRA file; both appear only if both succeed."""
    config = plan.config
    lora_path = check_outputs(plan)
    model_config = graph.model_config(plan, config.cpu_kv_cache_size)
    lora_inputs = lora.lora_tensors(plan) if plan.lora is not None else None
    written = 0
    with files.atomic_output(config.output_path, "--output-tflite-file") as handle:
        if config.quantization == "int8" and stream.streamable(model_config):
            write_streamed(plan, model_config, handle, lora_inputs)
        else:
            write_whole(plan, model_config, handle, lora_inputs)
        progress(sum(item.nbytes for item in plan.base))
        written += handle.seek(0, io.SEEK_END)
        if lora_inputs is not None:
            written += lora.write_lora_file(plan, lora_inputs)
            progress(sum(item.nbytes for item in plan.lora or []))
    tensors = len(plan.base) + len(lora_inputs or {})
    return ConversionResult(config.output_path, lora_path, tensors, written)


def write_whole(plan: ConversionPlan, model_config: Any, output: BinaryIO, lora_inputs: dict | None) -> None:
    """litert-torch's export of the model with every weight loaded (fp32, fp16, int4)."""
    model = graph.build_model(plan, model_config)
    graph.load_weights(plan, model, model_config)
    sample = None
    if lora_inputs is not None:
        model, sample = graph.with_lora(model), export.lora_sample(lora_inputs, plan.dims.num_layers)
    export.export(model, model_config, output, plan.config.output_path.parent, plan.config.quantization,
                  plan.config.cpu_prefill_length, plan.config.cpu_kv_cache_size, sample)
