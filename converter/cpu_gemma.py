"""Gemma 1 as a litert-torch CPU graph, the shape the streaming path (cpu_stream.py) is measured on.

Builds litert-torch's Gemma 1 model from a checkpoint's config.json, exports prefill/decode
signatures as LiteRT-LM's CPU executor takes them (attention mask as input, transposed KV cache,
int8 weights per channel), and names, for each graph parameter, the checkpoint tensors it holds.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import TensorSource
from .cpu.litert import example, litert_torch
from .cpu_stream import distinct_constants, use_placeholders

LAYER = "model.layers.{}."
# litert-torch parameter (per layer) -> checkpoint tensors stacked along rows.
LAYER_MATRICES: dict[str, tuple[str, ...]] = {
    "atten_func.qkv_projection.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "atten_func.output_projection.weight": ("self_attn.o_proj.weight",),
    "ff.w1.weight": ("mlp.gate_proj.weight",),
    "ff.w3.weight": ("mlp.up_proj.weight",),
    "ff.w2.weight": ("mlp.down_proj.weight",),
}
LAYER_VECTORS = {"pre_atten_norm.weight": "input_layernorm.weight",
                 "post_atten_norm.weight": "post_attention_layernorm.weight"}
MATRICES: dict[str, tuple[str, ...]] = {"tok_embedding.weight": ("model.embed_tokens.weight",)}
VECTORS = {"final_norm.weight": "model.norm.weight"}
TIED = {"lm_head.weight": "tok_embedding.weight"}  # Gemma's output projection is its embedding


def model_config(config: dict):
    """litert-torch's Gemma 1 config with the checkpoint's dimensions."""
    result = example("gemma.gemma1").get_model_config_2b()
    attention = result.block_config(0).attn_config
    attention.num_heads = config["num_attention_heads"]
    attention.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    attention.num_query_groups = config.get("num_key_value_heads", attention.num_heads)
    result.block_config(0).ff_config.intermediate_size = config["intermediate_size"]
    result.vocab_size = config["vocab_size"]
    result.num_layers = config["num_hidden_layers"]
    result.embedding_dim = config["hidden_size"]
    result.embedding_scale = config["hidden_size"] ** 0.5
    return result


def graph_names(layers: int) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Graph parameter -> checkpoint tensors, for matrices and for vectors."""
    matrices, vectors = dict(MATRICES), dict(VECTORS)
    for i in range(layers):
        prefix, layer = f"transformer_blocks.{i}.", LAYER.format(i)
        matrices.update({prefix + k: tuple(layer + n for n in v) for k, v in LAYER_MATRICES.items()})
        vectors.update({prefix + k: layer + v for k, v in LAYER_VECTORS.items()})
    return matrices, vectors


def read_whole(source: TensorSource, name: str) -> torch.Tensor:
    rows = source.info(name).shape[0]
    with source.rows(name, 0, rows) as values:
        return values.to(torch.float32).clone()


def build_model(config: dict, source: TensorSource, placeholders: bool) -> tuple[torch.nn.Module, list[str]]:
    """The litert-torch model: real weights (read whole), or matrix placeholders (built on the meta
    device, nothing of the matrices allocated). Returns it and its matrix names in marker order."""
    litert_torch()
    from litert_torch.generative.utilities import model_builder

    matrices, vectors = graph_names(config["num_hidden_layers"])
    values = {k: read_whole(source, v) for k, v in vectors.items()}
    if placeholders:
        with torch.device("meta"):
            model = model_builder.DecoderOnlyModel(model_config(config))
        order = use_placeholders(model, values, TIED)
    else:
        model = model_builder.DecoderOnlyModel(model_config(config))
        state = {k: torch.cat([read_whole(source, n) for n in v]) for k, v in matrices.items()}
        state["lm_head.weight"] = state["tok_embedding.weight"]
        model.load_state_dict({**state, **values})
        order = [k for k in matrices]
    return model.eval(), order


def export(model: torch.nn.Module, config: dict, out: Path, prefill: int, kv_cache: int, lora_rank: int = 0) -> Path:
    """litert-torch's documented export: prefill/decode signatures (and, with a LoRA rank, the same
    with LoRA inputs), int8 weights per channel."""
    lt = litert_torch()
    settings = lt.export_config.ExportConfig(mask_as_input=True, kvcache_layout=lt.kv_cache.KV_LAYOUT_TRANSPOSED)
    with distinct_constants():
        path = lt.converter.convert_to_tflite(model, output_path=str(out), output_name_prefix="model",
                                           prefill_seq_len=[prefill], kv_cache_max_len=kv_cache,
                                           quantize="dynamic_int8", config=model_config(config),
                                           export_config=settings, lora_ranks=[lora_rank] if lora_rank else None)
    return Path(path)
