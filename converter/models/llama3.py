"""Llama 3.x: LLAMA3_2_1B, LLAMA3_2_3B, Hugging Face `LlamaForCausalLM` (CPU only).

RMSNorm before attention and MLP, SiLU-gated MLP, no biases, grouped-query attention, rotary on
the whole head with base `rope_theta` (500000) and Llama 3's frequency scaling (`rope_scaling`
of type "llama3": long wavelengths divided by `factor`, short ones kept, the band between blended),
the output projection tied to the embedding. MediaPipe's GPU runtime has no Llama model type; the
CPU backend builds litert-torch's Llama 3.2 graph, with the settings that vary between checkpoints
(norm epsilon, rotary base and scaling) read from config.json. The tensor and LoRA rules are
Gemma's (same Hugging Face names); Qwen 2.5 (qwen2.py) extends this file.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from ..errors import ConversionError
from ..proto import llm_params_pb2
from ..proto.transformer_params_pb2 import TransformerParameters as TP
from .base import Architecture, CpuGraph, Dims, ModelFamily, ModelType, rope_theta, sized_parameters
from .checks import require
from .gemma import EMBEDDING, FINAL_NORM, INPUT_NORM, LORA, MLP, REQUIRED_LORA, TIED_LM_HEAD, K, O, Q, V, norm
from .values import flag, integer, mapping, number, text

BACKENDS = ("cpu",)
ROPE_THETA = 500000.0
NORM_EPS = 1e-5  # Llama 3's; a config.json without rms_norm_eps gets transformers' default, 1e-6
DEFAULT_NORM_EPS = 1e-6
START_TOKEN_ID = 128000  # <|begin_of_text|>
STOP_TOKENS = ("<|end_of_text|>", "<|eot_id|>")
ARCHITECTURE = Architecture(norm_eps=NORM_EPS, rope_theta=ROPE_THETA, free_head_dim=True)

MLP_NORM = norm("post_attention_layernorm", "ff_layer.pre_layer_norm.scale", "mlp_norm")


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of a checkpoint: base, and Llama 3's scaling when `factor` is set."""

    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


def rope_kind(config: dict) -> tuple[str, dict]:
    """The rotary type and its settings, from transformers 4's `rope_scaling` or 5's `rope_parameters`."""
    settings = mapping(config, "rope_scaling") or mapping(config, "rope_parameters")
    return text(settings, "rope_type", text(settings, "type", "default")), settings


def rope(config: dict, scaling: tuple[str, ...] = ("default", "llama3")) -> Rope:
    """The checkpoint's rotary settings; a rotary type outside `scaling` is refused, naming it."""
    kind, settings = rope_kind(config)
    if kind not in scaling:
        raise ConversionError(f"config.json: rope_scaling type {kind!r} is not supported (the CPU graph models "
                              f"{' or '.join(repr(k) for k in scaling)})")
    theta = rope_theta(config)
    if kind == "default":
        return Rope(theta)
    low = number(settings, "low_freq_factor", above_low=True, source="config.json rope_scaling")
    high = number(settings, "high_freq_factor", above_low=True, source="config.json rope_scaling")
    if high <= low:
        raise ConversionError(f"config.json: rope_scaling high_freq_factor {high:g} must be above "
                              f"low_freq_factor {low:g}")
    return Rope(theta, number(settings, "factor", above_low=True, source="config.json rope_scaling"), low, high,
                integer(settings, "original_max_position_embeddings", source="config.json rope_scaling"))


def norm_eps(config: dict) -> float:
    """The RMSNorm epsilon, as transformers reads it."""
    return number(config, "rms_norm_eps", DEFAULT_NORM_EPS, above_low=True, high=1e-2)


def check_common(config: dict) -> None:
    """Refuse what the CPU graph of a Llama-style model does not express: another activation, a
    sliding window, biases on the MLP or the output projection."""
    require(config, "hidden_act", ("silu",), "silu")
    require(config, "mlp_bias", (False,), False)
    if not flag(config, "tie_word_embeddings", True):
        raise ConversionError("config.json: tie_word_embeddings false (a separate lm_head) is not supported: the "
                              "CPU graph's output projection is the embedding")
    if flag(config, "use_sliding_window", False):
        raise ConversionError("config.json: use_sliding_window true is not supported (the CPU graph attends to "
                              "every position)")
    norm_eps(config)


def llama_parameters(dims: Dims, config: dict, start_token_id: int, stop_tokens: tuple[str, ...],
                     qkv_bias: bool) -> llm_params_pb2.LlmParameters:
    """LlmParameters of a Llama-style model: pre-norms (RMS), SiLU-gated MLP, causal attention
    scaled by 1/sqrt(head_dim), q/k/v biases when `qkv_bias`."""
    start = config.get("bos_token_id")  # null (Qwen 2.5 in transformers 5) means the family's
    start = integer({"bos_token_id": start_token_id if start is None else start}, "bos_token_id", low=0,
                    high=dims.vocab_size - 1)
    params = sized_parameters(dims, start, list(stop_tokens))
    t = params.transformer_parameters
    t.feed_forward_parameters.CopyFrom(TP.FeedForwardParameters(no_bias=True, activation=TP.SILU,
                                                                pre_norm=TP.RMS_NORM, post_norm=TP.NO_NORM))
    t.final_project_parameters.no_bias = True
    t.pre_norm, t.post_norm, t.final_norm = TP.RMS_NORM, TP.NO_NORM, TP.RMS_NORM
    t.self_attention_parameters.CopyFrom(TP.SelfAttentionParameters(
        qkv_no_bias=not qkv_bias, post_proj_no_bias=True, attention_mask_type=TP.CAUSAL,
        attention_scale_type=TP.SCALE_TYPE_INV_SQRT_HEAD_DIM))
    return params


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Llama 3.x checkpoint (start/stop tokens and sizes; checks the config)."""
    check_common(config)
    require(config, "attention_bias", (False,), False)
    rope(config)
    return llama_parameters(dims, config, START_TOKEN_ID, STOP_TOKENS, qkv_bias=False)


def configure(model: Any, config: dict) -> None:
    """config.json's settings beyond the sizes on litert-torch's Llama 3.2 ModelConfig (`CpuGraph.configure`):
    RMSNorm epsilon, rotary base and Llama 3 scaling (factor 1 leaves every frequency as it is)."""
    rotary, eps = rope(config), norm_eps(config)
    for block in model.block_configs:
        block.attn_config.rotary_base = rotary.theta
        block.pre_attention_norm_config.epsilon = block.post_attention_norm_config.epsilon = eps
    model.final_norm_config.epsilon = eps
    model.build_rope = partial(model.build_rope.func, **{
        **model.build_rope.keywords, "factor": rotary.factor, "low_freq_factor": rotary.low_freq_factor,
        "high_freq_factor": rotary.high_freq_factor, "max_seq_len": rotary.original_context})


LAYER = (INPUT_NORM, Q, K, V, O, MLP_NORM, *MLP)

FAMILY = ModelFamily(
    name="llama3",
    hf_model_types=("llama",),
    model_types=(
        # enum 0: MediaPipe has no Llama model type (CPU only; nothing is written for the GPU).
        ModelType("LLAMA3_2_1B", 0, Dims(16, 2048, 8192, 32, 8, 64, 128256), context=131072),
        ModelType("LLAMA3_2_3B", 0, Dims(28, 3072, 8192, 24, 8, 128, 128256), context=131072),
    ),
    head=(EMBEDDING,),
    layer=LAYER,
    tail=(FINAL_NORM,),
    lora=LORA,
    required_lora=REQUIRED_LORA,
    tied_copies=TIED_LM_HEAD,
    parameters=parameters,
    backends=BACKENDS,
    architecture=ARCHITECTURE,
    cpu=CpuGraph("llama.llama", "get_1b_model_config", "Llama",
                 params={"mlp_norm": "transformer_blocks.{i}.post_atten_norm.weight"}, lora=True, configure=configure),
)
