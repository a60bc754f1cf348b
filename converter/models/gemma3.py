"""Gemma 3 text models: GEMMA3_300M (270M) and GEMMA3_1B (`Gemma3ForCausalLM`), and the text part of
GEMMA3_4B/12B/27B (`Gemma3ForConditionalGeneration`: `language_model.` names; vision tower and
projector are left out).

Gemma 2's block plus per-head RMS norms on queries and keys (`q_norm`, `k_norm`, Gemma's 1 + w),
no soft caps, and a pattern of `num_local_layers_per_global` sliding-window layers (rotary base
10000) followed by one global layer (rotary base `global_rope_wavelength`, positions divided by
`global_rope_scaling`). MediaPipe 0.10.21 does not know Gemma 3; names follow the last upstream
Python converter (GemmaMapper, before its removal in 253fde43757b) and parameters the last
upstream well_known_models.cc (before 83fdad9bb95d). The 4B and larger embeddings have 262208
rows for a 262144-piece tokenizer: 64 image-token rows no piece names.
"""
from __future__ import annotations

from ..errors import ConversionError
from ..proto import llm_params_pb2
from typing import Any

from .base import CpuGraph, Dims, ModelFamily, ModelType, Role, WeightRule, is_close
from .gemma import (ARCHITECTURE, EMBEDDING, FINAL_NORM, LORA, REQUIRED_LORA, TIED_LM_HEAD, attention_scale_type,
                    base_parameters, check_common, check_cpu_query_scale, soft_cap)
from .gemma2 import CPU_NORMS, POST_NORMS_LAYER
from .values import flag, integer, mapping, number, strings, text

LOCAL_ROPE_THETA = ARCHITECTURE.rope_theta
# transformers' Gemma3TextConfig defaults: older config.json files leave them out of `text_config`.
DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
    "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
}
GEMMA3_1B = Dims(26, 1152, 6912, 4, 1, 256, 262144)


def text_config(config: dict) -> dict:
    """The text model's settings: `text_config` of a multimodal config, with transformers' defaults."""
    return {**DEFAULTS, **(mapping(config, "text_config") or config)}


def rope_settings(config: dict) -> tuple[float, float, float]:
    """(local base, global base, global linear scaling) from transformers 5's per-layer-type
    `rope_parameters` or transformers 4's `rope_local_base_freq`, `rope_theta` and `rope_scaling`."""
    per_type = mapping(config, "rope_parameters")
    if "full_attention" in per_type:
        local, full = mapping(per_type, "sliding_attention"), mapping(per_type, "full_attention")
    else:
        local = {"rope_theta": config.get("rope_local_base_freq")}
        full = {**mapping(config, "rope_scaling"), "rope_theta": config.get("rope_theta")}
    kinds = {name: text(settings, "rope_type", text(settings, "type", "default"))
             for name, settings in (("sliding_attention", local), ("full_attention", full))}
    for name, allowed in (("sliding_attention", ("default",)), ("full_attention", ("default", "linear"))):
        if kinds[name] not in allowed:
            raise ConversionError(f"config.json: {name} rope_type {kinds[name]!r} is not supported "
                                  f"(runtime: {' or '.join(allowed)})")
    scaling = number(full, "factor", 1.0, above_low=True) if kinds["full_attention"] == "linear" else 1.0
    return (number(local, "rope_theta", DEFAULTS["rope_local_base_freq"], above_low=True),
            number(full, "rope_theta", DEFAULTS["rope_theta"], above_low=True), scaling)


def local_layers_per_global(config: dict, num_layers: int) -> int:
    """n in the runtime's pattern of n sliding-window layers then one global layer, checked against
    `layer_types` (transformers 5) or taken from `sliding_window_pattern` (transformers 4)."""
    key = next((k for k in ("sliding_window_pattern", "_sliding_window_pattern") if config.get(k) is not None), None)
    pattern = integer(config, key) if key else integer(DEFAULTS, "sliding_window_pattern")
    layer_types = strings(config, "layer_types")
    if layer_types:
        globals_ = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        pattern = globals_[0] + 1 if globals_ else num_layers + 1
        expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
        if list(layer_types) != expected:
            raise ConversionError(
                "config.json: layer_types must repeat n sliding_attention layers then one full_attention layer "
                "(the runtime's num_local_layers_per_global)"
            )
    return pattern - 1


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Gemma 3 text model, as upstream MediaPipe's well_known_models.cc writes them."""
    config = text_config(config)
    check_common(config, theta=None)
    if flag(config, "use_bidirectional_attention", False):
        raise ConversionError("config.json: use_bidirectional_attention is not supported (the runtime is causal)")
    local_theta, global_theta, global_scaling = rope_settings(config)
    if not is_close(local_theta, LOCAL_ROPE_THETA):
        raise ConversionError(f"config.json: sliding-window rope_theta {local_theta:g} is not supported "
                              f"(runtime uses {LOCAL_ROPE_THETA:g})")
    params = base_parameters(
        dims, post_norms=True, attention_cap=soft_cap(config, "attn_logit_softcapping", None),
        final_cap=soft_cap(config, "final_logit_softcapping", None), scale_type=attention_scale_type(dims, config),
        stop_tokens=("<eos>", "<end_of_turn>"),
    )
    t = params.transformer_parameters
    t.self_attention_parameters.qk_norm = True
    t.self_attention_parameters.sliding_window_size = integer(config, "sliding_window")
    t.num_local_layers_per_global = local_layers_per_global(config, dims.num_layers)
    t.global_rope_wavelength = global_theta
    if global_scaling != 1.0:
        t.global_rope_scaling = global_scaling
    if dims != GEMMA3_1B:  # upstream: every size but 1B needs the fix for fp16 activations
        t.gemma3_bfloat16_fix = True
    return params


def configure_cpu(model_config: Any, config: dict) -> None:
    """litert-torch's Gemma 3 graph: the checkpoint's window, local/global pattern and rotary bases;
    what it cannot express (scaled global rotary, a final soft cap, another query scale) is refused."""
    config = text_config(config)
    check_cpu_query_scale(config, model_config.block_config(0).attn_config.head_dim)
    local_theta, global_theta, global_scaling = rope_settings(config)
    if global_scaling != 1.0:
        raise ConversionError(f"config.json: the global layers' linear rotary scaling (factor {global_scaling:g}) "
                              "cannot be expressed by --backend cpu (litert-torch's Gemma 3 graph has none)")
    if soft_cap(config, "final_logit_softcapping", None):
        raise ConversionError("config.json: final_logit_softcapping cannot be expressed by --backend cpu "
                              "(litert-torch's Gemma 3 graph has none)")
    pattern = local_layers_per_global(config, model_config.num_layers) + 1
    window, cap = integer(config, "sliding_window"), soft_cap(config, "attn_logit_softcapping", None) or None
    for i, block in enumerate(model_config.block_configs):
        is_global = (i + 1) % pattern == 0
        block.attn_config.attn_type = type(block.attn_config.attn_type)["GLOBAL" if is_global else "LOCAL_SLIDING"]
        block.attn_config.rotary_base = global_theta if is_global else local_theta
        block.attn_config.sliding_window_size = window
        block.attn_config.logit_softcap = cap


QK_NORMS = (
    WeightRule("self_attn.q_norm.weight", "self_attention.q_norm.scale", Role.NORM, ("head_dim",), slot="q_norm"),
    WeightRule("self_attn.k_norm.weight", "self_attention.k_norm.scale", Role.NORM, ("head_dim",), slot="k_norm"),
)

FAMILY = ModelFamily(
    name="gemma3",
    hf_model_types=("gemma3_text", "gemma3"),
    model_types=(
        ModelType("GEMMA3_300M", 38, Dims(18, 640, 2048, 4, 1, 256, 262144), context=32768),
        ModelType("GEMMA3_1B", 27, GEMMA3_1B, context=32768),
        ModelType("GEMMA3_4B", 28, Dims(34, 2560, 10240, 8, 4, 256, 262208), context=131072),
        ModelType("GEMMA3_12B", 29, Dims(48, 3840, 15360, 16, 8, 256, 262208), context=131072),
        ModelType("GEMMA3_27B", 30, Dims(62, 5376, 21504, 32, 16, 128, 262208), context=131072),
    ),
    head=(EMBEDDING,),
    layer=(*POST_NORMS_LAYER[:5], *QK_NORMS, *POST_NORMS_LAYER[5:]),
    tail=(FINAL_NORM,),
    lora=LORA,
    required_lora=REQUIRED_LORA,
    tied_copies=TIED_LM_HEAD,
    parameters=parameters,
    architecture=ARCHITECTURE,
    name_prefixes=("language_model.",),
    skipped=("vision_tower", "multi_modal_projector"),
    untokenized_rows=64,
    text_config=text_config,
    backends=("gpu", "cpu"),
    cpu=CpuGraph("gemma3.decoder", "get_decoder_config_1b", "Decoder", params=CPU_NORMS, configure=configure_cpu,
                 lora=True),
)
