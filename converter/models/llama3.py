"""Llama 3.x: LLAMA3_2_1B, LLAMA3_2_3B, LLAMA3_1_8B, Hugging Face `LlamaForCausalLM` (CPU only).

RMSNorm before attention and MLP, SiLU-gated MLP, no biases, grouped-query attention, rotary on
the whole head with base `rope_theta` (500000) and Llama 3's frequency scaling (`rope_scaling`
of type "llama3": long wavelengths divided by `factor`, short ones kept, the band between blended),
the output projection tied to the embedding (1B, 3B) or a separate `lm_head` (8B). MediaPipe's GPU
runtime has no Llama model type; the CPU backend builds the graph with litert-torch. The settings
that vary between checkpoints (norm epsilon, rotary base and scaling) are read from config.json.
The layer rules are Gemma's (same Hugging Face names); Qwen 2.5 (qwen2.py) extends this file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConversionError
from ..proto import llm_params_pb2
from ..proto.transformer_params_pb2 import TransformerParameters as TP
from .base import Architecture, Dims, ModelFamily, ModelType, Role, WeightRule, rope_theta, sized_parameters
from .checks import require
from .gemma import FINAL_NORM, INPUT_NORM, LORA, MLP, REQUIRED_LORA, K, O, Q, V, norm
from .values import flag, integer, mapping, number, text

BACKENDS = ("cpu",)
ROPE_THETA = 500000.0
NORM_EPS = 1e-5  # Llama 3's; a config.json without rms_norm_eps gets transformers' default, 1e-6
DEFAULT_NORM_EPS = 1e-6
START_TOKEN_ID = 128000  # <|begin_of_text|>
STOP_TOKENS = ("<|end_of_text|>", "<|eot_id|>")
ARCHITECTURE = Architecture(norm_eps=NORM_EPS, rope_theta=ROPE_THETA, free_head_dim=True)

EMBEDDING = WeightRule("model.embed_tokens.weight", "params.lm.token_embedding.w", Role.EMBEDDING,
                       ("vocab_size", "hidden_size"), lookup_order=True, slot="embedding")
# Tied checkpoints (tie_word_embeddings: 1B, 3B) have no lm_head: the embedding is read in its place.
LM_HEAD = WeightRule("lm_head.weight", "params.lm.softmax.logits_ffn.w", Role.EMBEDDING, ("vocab_size", "hidden_size"),
                     tied=EMBEDDING.hf, slot="lm_head")
MLP_NORM = norm("post_attention_layernorm", "ff_layer.pre_layer_norm.scale", "mlp_norm")


@dataclass(frozen=True)
class Rope:
    """The rotary embedding of a checkpoint: base, and Llama 3's scaling when `factor` is set."""

    theta: float
    factor: float | None = None
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


def litert_config(dims: Dims, config: dict, context: int) -> Any:
    """litert-torch's ModelConfig for a Llama 3.x checkpoint (its Llama 3.2 example's layers, with
    the checkpoint's sizes, epsilon, rotary base and scaling), for a KV cache of `context` positions."""
    return litert_model_config(dims, config, context, rope(config), qkv_bias=False)


def litert_model_config(dims: Dims, config: dict, context: int, rotary: Rope, qkv_bias: bool) -> Any:
    """litert-torch's ModelConfig for a Llama-style decoder (shared with Qwen 2.5)."""
    from functools import partial

    import torch

    from ..litert_torch_shim import allow_import

    allow_import()
    from litert_torch.generative.examples.llama import llama
    from litert_torch.generative.layers import model_config as cfg

    norm_config = cfg.NormalizationConfig(type=cfg.NormalizationType.RMS_NORM, epsilon=norm_eps(config))
    block = cfg.TransformerBlockConfig(
        attn_config=cfg.AttentionConfig(num_heads=dims.num_heads, head_dim=dims.head_dim,
                                        num_query_groups=dims.num_kv_heads, rotary_base=rotary.theta,
                                        rotary_percentage=1.0, qkv_use_bias=qkv_bias),
        ff_config=cfg.FeedForwardConfig(type=cfg.FeedForwardType.GATED,
                                        activation=cfg.ActivationConfig(cfg.ActivationType.SILU),
                                        intermediate_size=dims.intermediate_size),
        pre_attention_norm_config=norm_config,
        post_attention_norm_config=norm_config,
    )
    extra = {}
    if rotary.factor is not None:
        extra["build_rope"] = partial(llama._build_llama3_rope_cache, condense_ratio=1, dtype=torch.float32,
                                      device=torch.device("cpu"), factor=rotary.factor,
                                      low_freq_factor=rotary.low_freq_factor,
                                      high_freq_factor=rotary.high_freq_factor, max_seq_len=rotary.original_context)
    return cfg.ModelConfig(vocab_size=dims.vocab_size, num_layers=dims.num_layers, max_seq_len=context,
                           embedding_dim=dims.hidden_size, block_configs=block, final_norm_config=norm_config,
                           lm_head_share_weight_with_embedding=flag(config, "tie_word_embeddings", True), **extra)


LAYER = (INPUT_NORM, Q, K, V, O, MLP_NORM, *MLP)

FAMILY = ModelFamily(
    name="llama3",
    hf_model_types=("llama",),
    model_types=(
        # enum 0: MediaPipe has no Llama model type (CPU only; nothing is written for the GPU).
        ModelType("LLAMA3_2_1B", 0, Dims(16, 2048, 8192, 32, 8, 64, 128256), context=131072),
        ModelType("LLAMA3_2_3B", 0, Dims(28, 3072, 8192, 24, 8, 128, 128256), context=131072),
        ModelType("LLAMA3_1_8B", 0, Dims(32, 4096, 14336, 32, 8, 128, 128256), context=131072),
    ),
    head=(EMBEDDING,),
    layer=LAYER,
    tail=(FINAL_NORM, LM_HEAD),
    lora=LORA,
    required_lora=REQUIRED_LORA,
    parameters=parameters,
    backends=BACKENDS,
    architecture=ARCHITECTURE,
)
