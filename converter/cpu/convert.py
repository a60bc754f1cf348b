"""Run a `--backend cpu` plan: build, load and export the graph, then write the LoRA file."""
from __future__ import annotations

from .. import files
from ..convert import ConversionResult, Progress, check_outputs
from ..plan import ConversionPlan
from . import export, graph, lora


def execute_cpu(plan: ConversionPlan, progress: Progress = lambda n: None) -> ConversionResult:
    """Write the CPU graph and, with an adapter, its LoRA file; both appear only if both succeed."""
    config = plan.config
    lora_path = check_outputs(plan)
    model_config = graph.model_config(plan, config.cpu_kv_cache_size)
    model = graph.build_model(plan, model_config)
    graph.load_weights(plan, model, model_config)
    progress(sum(item.nbytes for item in plan.base))
    lora_inputs = lora.lora_tensors(plan) if plan.lora is not None else None
    sample = None
    if lora_inputs is not None:
        model, sample = graph.with_lora(model), export.lora_sample(lora_inputs, plan.dims.num_layers)
    written = 0
    with files.atomic_output(config.output_path, "--output-tflite-file") as handle:
        export.export(model, model_config, handle, config.output_path.parent, config.quantization, config.cpu_prefill_length,
                      config.cpu_kv_cache_size, sample)
        written += handle.tell()
        if lora_inputs is not None:
            written += lora.write_lora_file(plan, lora_inputs)
            progress(sum(item.nbytes for item in plan.lora or []))
    tensors = len(plan.base) + len(lora_inputs or {})
    return ConversionResult(config.output_path, lora_path, tensors, written)
