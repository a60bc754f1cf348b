"""Gemma (1st generation): GEMMA_2B and GEMMA_7B, Hugging Face `GemmaForCausalLM`.

Tied embeddings (one `logits_ffn.w` serves lookup and output), RMSNorm stored as in the
checkpoint (the runtime adds Gemma's `1 + w`), embeddings scaled by sqrt(hidden), GELU-gated
MLP, no biases, rotary base 10000. The rules and parameter helpers here are shared by the
later Gemma generations (gemma2.py, gemma3.py).
"""
from __future__ import annotations

from ..errors import ConversionError
from ..proto import llm_params_pb2
from ..proto.transformer_params_pb2 import TransformerParameters as TP
from .base import (Architecture, CpuGraph, Dims, LoraRule, ModelFamily, ModelType, Role, WeightRule, is_close,
                   rope_theta, sized_parameters)
from .values import number, optional_number, text

H = ("hidden_size",)
GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")
ARCHITECTURE = Architecture(norm_eps=1e-6, norm_offset=1.0, scale_embedding=True, gelu_approximate="tanh",
                            free_head_dim=True)

EMBEDDING = WeightRule("model.embed_tokens.weight", "params.lm.softmax.logits_ffn.w", Role.EMBEDDING,
                       ("vocab_size", "hidden_size"), lookup_order=True, slot="embedding")
# The embedding is the output projection too; an lm_head saved beside it must be the same tensor.
TIED_LM_HEAD = (("lm_head.weight", EMBEDDING.hf),)
FINAL_NORM = WeightRule("model.norm.weight", "params.lm.final_ln.scale", Role.NORM, H, slot="final_norm")


def norm(hf: str, mp: str, slot: str, shape: tuple[str, ...] = H) -> WeightRule:
    return WeightRule(f"{hf}.weight", mp, Role.NORM, shape, slot=slot)


def linear(hf: str, mp: str, role: Role, shape: tuple[str, str], slot: str) -> WeightRule:
    return WeightRule(f"{hf}.weight", f"{mp}.w", role, shape, slot=slot)


Q = linear("self_attn.q_proj", "self_attention.q", Role.ATTENTION, ("q_size", "hidden_size"), "q")
K = linear("self_attn.k_proj", "self_attention.k", Role.ATTENTION, ("kv_size", "hidden_size"), "k")
V = linear("self_attn.v_proj", "self_attention.v", Role.ATTENTION, ("kv_size", "hidden_size"), "v")
O = linear("self_attn.o_proj", "self_attention.post", Role.ATTENTION, ("hidden_size", "q_size"), "o")
MLP = (
    linear("mlp.gate_proj", "ff_layer.ffn_layer1_gate", Role.FEEDFORWARD, ("intermediate_size", "hidden_size"), "gate"),
    linear("mlp.up_proj", "ff_layer.ffn_layer1", Role.FEEDFORWARD, ("intermediate_size", "hidden_size"), "up"),
    linear("mlp.down_proj", "ff_layer.ffn_layer2", Role.FEEDFORWARD, ("hidden_size", "intermediate_size"), "down"),
)
INPUT_NORM = norm("input_layernorm", "pre_layer_norm.scale", "attn_norm")

LORA = (
    LoraRule("self_attn.q_proj", "self_attention.q", "w_prime_left", "w_prime_right", "hidden_size", "q_size"),
    LoraRule("self_attn.k_proj", "self_attention.k", "w_prime_left", "w_prime_right", "hidden_size", "kv_size"),
    LoraRule("self_attn.v_proj", "self_attention.v", "w_prime_left", "w_prime_right", "hidden_size", "kv_size"),
    LoraRule("self_attn.o_proj", "self_attention.post", "w_prime_right", "w_prime_left", "q_size", "hidden_size",
             transposed_in_mediapipe=True),
    LoraRule("mlp.gate_proj", "ff_layer.ffn_layer1_gate", "w_prime_left", "w_prime_right", "hidden_size",
             "intermediate_size"),
    LoraRule("mlp.up_proj", "ff_layer.ffn_layer1", "w_prime_left", "w_prime_right", "hidden_size",
             "intermediate_size"),
    LoraRule("mlp.down_proj", "ff_layer.ffn_layer2", "w_prime_left", "w_prime_right", "intermediate_size",
             "hidden_size"),
)
REQUIRED_LORA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def check_common(config: dict, theta: float | None = 10000.0) -> None:
    """Refuse settings the runtime cannot follow: another activation, norm epsilon or rotary base."""
    activation = text(config, "hidden_activation", text(config, "hidden_act", "gelu_pytorch_tanh"))
    if activation not in GELU_NAMES:
        raise ConversionError(f"config.json: hidden_activation {activation!r} is not supported (expected a GELU)")
    eps = number(config, "rms_norm_eps", ARCHITECTURE.norm_eps, above_low=True)
    if not is_close(eps, ARCHITECTURE.norm_eps):
        raise ConversionError(f"config.json: rms_norm_eps {eps} is not supported (runtime uses {ARCHITECTURE.norm_eps})")
    if theta is not None:
        if not is_close(rope_theta(config), theta):
            raise ConversionError(f"config.json: rope_theta {rope_theta(config)} is not supported (runtime uses {theta:g})")
        if config.get("rope_scaling"):
            raise ConversionError("config.json: rope_scaling is not supported by the runtime")


def attention_scale_type(dims: Dims, config: dict) -> int:
    """Gemma 2/3 scale queries by 1/sqrt(query_pre_attn_scalar): head_dim or hidden/heads."""
    scalar = number(config, "query_pre_attn_scalar", dims.head_dim, above_low=True)
    if scalar == dims.head_dim:
        return TP.SCALE_TYPE_INV_SQRT_HEAD_DIM
    if scalar * dims.num_heads == dims.hidden_size:
        return TP.SCALE_TYPE_INV_SQRT_D_MODEL_DIV_NUM_HEADS
    raise ConversionError(
        f"config.json: query_pre_attn_scalar {scalar:g} is not supported: the runtime scales queries by "
        f"1/sqrt(head_dim={dims.head_dim}) or 1/sqrt(hidden_size/num_attention_heads="
        f"{dims.hidden_size / dims.num_heads:g})"
    )


def check_cpu_query_scale(config: dict, head_dim: int) -> None:
    """litert-torch's attention scales queries by 1/sqrt(head_dim) only (--backend cpu)."""
    scalar = number(config, "query_pre_attn_scalar", head_dim, above_low=True)
    if scalar != head_dim:
        raise ConversionError(f"config.json: query_pre_attn_scalar {scalar:g} cannot be expressed by --backend cpu: "
                              f"litert-torch's graph scales queries by 1/sqrt(head_dim={head_dim})")


def soft_cap(config: dict, key: str, default: float | None) -> float:
    """A tanh soft cap from config.json: absent means `default`, null means off (written as 0)."""
    return optional_number(config, key, default, above_low=True) or 0.0


def base_parameters(dims: Dims, *, post_norms: bool = False, attention_cap: float = 0.0, final_cap: float = 0.0,
                    scale_type: int = TP.SCALE_TYPE_INV_SQRT_HEAD_DIM,
                    stop_tokens: tuple[str, ...] = ("<eos>",)) -> llm_params_pb2.LlmParameters:
    """The LlmParameters every Gemma generation shares; `post_norms` adds Gemma 2's output norms."""
    post = TP.RMS_NORM if post_norms else TP.NO_NORM
    params = sized_parameters(dims, 2, list(stop_tokens))
    t = params.transformer_parameters
    t.feed_forward_parameters.CopyFrom(
        TP.FeedForwardParameters(no_bias=True, activation=TP.GELU, pre_norm=TP.RMS_NORM, post_norm=post)
    )
    t.final_project_parameters.CopyFrom(TP.FinalProjectParameters(no_bias=True, soft_cap_value=final_cap))
    t.pre_norm, t.post_norm, t.final_norm = TP.RMS_NORM, post, TP.RMS_NORM
    t.self_attention_parameters.CopyFrom(
        TP.SelfAttentionParameters(
            qkv_no_bias=True, post_proj_no_bias=True, attention_mask_type=TP.CAUSAL, soft_cap_value=attention_cap,
            attention_scale_type=scale_type,
        )
    )
    return params


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Gemma checkpoint, matching MediaPipe's for the real sizes."""
    check_common(config)
    return base_parameters(dims)


FAMILY = ModelFamily(
    name="gemma",
    hf_model_types=("gemma",),
    model_types=(
        ModelType("GEMMA_2B", 6, Dims(18, 2048, 16384, 8, 1, 256, 256000), context=8192),
        # MediaPipe 0.10.21 refuses LoRA for GEMMA_7B (its LoRA model list is GEMMA_2B, GEMMA2_2B, PHI_2).
        ModelType("GEMMA_7B", 12, Dims(28, 3072, 24576, 16, 16, 256, 256000), lora=False, context=8192),
    ),
    head=(EMBEDDING,),
    layer=(INPUT_NORM, Q, K, V, O, norm("post_attention_layernorm", "ff_layer.pre_layer_norm.scale", "mlp_norm"), *MLP),
    tail=(FINAL_NORM,),
    lora=LORA,
    required_lora=REQUIRED_LORA,
    tied_copies=TIED_LM_HEAD,
    parameters=parameters,
    architecture=ARCHITECTURE,
    backends=("gpu", "cpu"),
    # litert-torch's Gemma 1: its norm before the MLP is the block's `post_atten_norm`.
    cpu=CpuGraph("gemma.gemma1", "get_model_config_2b", "Gemma1",
                 params={"mlp_norm": "transformer_blocks.{i}.post_atten_norm.weight"}, lora=True),
)
