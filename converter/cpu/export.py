"""Export the litert-torch model as a LiteRT-LM CPU graph: prefill and decode signatures.

Signatures `prefill_<N>` (N tokens at a time) and `decode` (one token) take `tokens`,
`input_pos`, the attention `mask` (LiteRT-LM's CPU executor builds it and passes it in) and the
KV cache (`kv_cache_k_<layer>`, `kv_cache_v_<layer>` in the transposed layout the executor
expects), return the updated cache (and `logits` from decode) and, with an adapter, take the LoRA
tensors as inputs (`lora_atten_...`, see lora.py), which LiteRT-LM fills from the LoRA file
(zeros without one).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import ConversionError
from .litert import litert_torch
from .lora import PROJECTIONS, input_name

# --quantization -> litert-torch's recipe: int8/int4 weights with dynamic-range activations
# (what LiteRT-LM's CPU models use), fp16 weights, or none.
COPY_BLOCK = 16 << 20
RECIPES = {"int8": "dynamic_int8", "int4": "dynamic_int4_block32", "fp16": "fp16", "fp32": "none"}


def lora_sample(lora_inputs: dict[str, torch.Tensor], num_layers: int) -> Any:
    """litert-torch's LoRA object holding `lora_inputs` (the export names its leaves as LiteRT-LM reads them)."""
    lt = litert_torch().lora

    def weight(projection: str, layer: int) -> Any:
        return lt.LoRAWeight(a_prime=lora_inputs[input_name(projection, "a", layer)],
                             b_prime=lora_inputs[input_name(projection, "b", layer)])

    return lt.LoRA(adapters=tuple(lt.LoRAEntry(attention=lt.AttentionLoRA(*(weight(p, layer) for p in PROJECTIONS)))
                                  for layer in range(num_layers)))


def _mask(rows: int, kv_cache_size: int, value: float) -> torch.Tensor:
    return torch.triu(torch.full((rows, kv_cache_size), value), diagonal=1)[None, None]


def export(model: torch.nn.Module, config: Any, output: BinaryIO, scratch: Path, quantization: str, prefill_length: int,
           kv_cache_size: int, lora: Any | None) -> None:
    """Convert `model` to TFLite and copy it into `output` (litert-torch writes files by name only,
    so into a scratch folder beside `output`'s final path, which the caller makes atomic)."""
    lt = litert_torch()
    export_config = lt.export_config.ExportConfig(mask_as_input=True,
                                                  kvcache_layout=lt.kv_cache.KV_LAYOUT_TRANSPOSED)
    module = lt.converter.ExportableModule(model, export_config=export_config).eval()
    cache = lt.kv_cache.KVCache.from_model_config(kv_cache_size, config, kv_layout=export_config.kvcache_layout)
    signatures = {
        f"prefill_{prefill_length}": (torch.zeros((1, prefill_length), dtype=torch.int),
                                      torch.arange(prefill_length, dtype=torch.int)),
        "decode": (torch.zeros((1, 1), dtype=torch.int), torch.zeros(1, dtype=torch.int)),
    }
    converter = lt.interface.Converter()
    for name, (tokens, positions) in signatures.items():
        sample = {"tokens": tokens, "input_pos": positions, "kv_cache": cache,
                  "mask": _mask(tokens.shape[1], kv_cache_size, config.causal_mask_value)}
        if lora is not None:
            sample["lora"] = lora
        converter.add_signature(name, module, sample_kwargs=sample)
    recipe = lt.converter.get_quant_recipe_from_flag(RECIPES[quantization], config)
    try:
        converted = converter.convert(quant_config=recipe)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConversionError(f"litert-torch could not export the CPU graph: {str(error).splitlines()[0]}") from error
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        path = Path(folder) / "model.tflite"
        converted.export(str(path))
        with path.open("rb") as written:
            shutil.copyfileobj(written, output, COPY_BLOCK)
