"""Phi-2: PHI_2, Hugging Face `PhiForCausalLM`.

Parallel attention and MLP behind one LayerNorm (with bias), biases on every projection and on
the untied `lm_head`, GELU (tanh) MLP, rotary on the first 40% of each head, base 10000.
MediaPipe names the matrices `<m>.linear.w` and the biases `<m>.bias.b`.
"""
from __future__ import annotations

from ..proto import llm_params_pb2
from ..proto.transformer_params_pb2 import TransformerParameters as TP
from .base import (Architecture, CpuGraph, Dims, LoraRule, ModelFamily, ModelType, Role, WeightRule,
                   sized_parameters)
from .checks import require, require_close
from .values import integer

H = ("hidden_size",)
PARTIAL_ROTARY_FACTOR = 0.4  # what the runtime applies for PHI_2 (not in LlmParameters)
LAYER_NORM_EPS = 1e-5
START_TOKEN_ID = 50256  # <|endoftext|>, Phi-2's bos
ARCHITECTURE = Architecture(norm_eps=LAYER_NORM_EPS, gelu_approximate="tanh", gated_mlp=False, parallel_residual=True,
                            rotary_fraction=PARTIAL_ROTARY_FACTOR)


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Phi-2 checkpoint, matching MediaPipe's for the real size."""
    require(config, "hidden_act", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    require_close(config, "partial_rotary_factor", PARTIAL_ROTARY_FACTOR, default=0.5)
    require_close(config, "layer_norm_eps", LAYER_NORM_EPS)
    require_close(config, "rope_theta", 10000.0)
    require(config, "qk_layernorm", (False,), False)
    require(config, "rope_scaling", (None,), None)
    require(config, "rope_type", ("default",), "default")
    # phi-2's is START_TOKEN_ID; tiny models have their own
    start = integer(config, "bos_token_id", START_TOKEN_ID, low=0, high=dims.vocab_size - 1)
    params = sized_parameters(dims, start, ["<|endoftext|>"])
    t = params.transformer_parameters
    t.feed_forward_parameters.CopyFrom(TP.FeedForwardParameters(activation=TP.GELU, pre_norm=TP.NO_NORM,
                                                                post_norm=TP.NO_NORM))
    t.final_project_parameters.SetInParent()  # present and empty: the output projection has a bias
    t.pre_norm, t.post_norm, t.final_norm = TP.LAYER_NORM, TP.NO_NORM, TP.LAYER_NORM
    t.self_attention_parameters.CopyFrom(TP.SelfAttentionParameters(
        attention_mask_type=TP.CAUSAL, attention_scale_type=TP.SCALE_TYPE_INV_SQRT_HEAD_DIM))
    return params


def linear(hf: str, mp: str, role: Role, shape: tuple[str, str], slot: str) -> tuple[WeightRule, WeightRule]:
    """A projection with bias: `<hf>.weight` -> `<mp>.linear.w`, `<hf>.bias` -> `<mp>.bias.b`."""
    return (WeightRule(f"{hf}.weight", f"{mp}.linear.w", role, shape, slot=slot),
            WeightRule(f"{hf}.bias", f"{mp}.bias.b", Role.BIAS, shape[:1], slot=f"{slot}.bias"))


def layer_norm(hf: str, mp: str, slot: str) -> tuple[WeightRule, WeightRule]:
    """A LayerNorm: `<hf>.weight` -> `<mp>.scale`, `<hf>.bias` -> `<mp>.bias`."""
    return (WeightRule(f"{hf}.weight", f"{mp}.scale", Role.NORM, H, slot=slot),
            WeightRule(f"{hf}.bias", f"{mp}.bias", Role.NORM, H, slot=f"{slot}.bias"))


FAMILY = ModelFamily(
    name="phi",
    hf_model_types=("phi",),
    model_types=(ModelType("PHI_2", 11, Dims(32, 2560, 10240, 32, 32, 80, 51200), context=2048),),
    head=(
        WeightRule("model.embed_tokens.weight", "params.lm.token_embedding.w", Role.EMBEDDING,
                   ("vocab_size", "hidden_size"), lookup_order=True, slot="embedding"),
    ),
    layer=(
        *layer_norm("input_layernorm", "pre_layer_norm", "attn_norm"),
        *linear("self_attn.q_proj", "self_attention.q", Role.ATTENTION, ("q_size", "hidden_size"), "q"),
        *linear("self_attn.k_proj", "self_attention.k", Role.ATTENTION, ("kv_size", "hidden_size"), "k"),
        *linear("self_attn.v_proj", "self_attention.v", Role.ATTENTION, ("kv_size", "hidden_size"), "v"),
        *linear("self_attn.dense", "self_attention.post", Role.ATTENTION, ("hidden_size", "q_size"), "o"),
        *linear("mlp.fc1", "ff_layer.ffn_layer1", Role.FEEDFORWARD, ("intermediate_size", "hidden_size"), "up"),
        *linear("mlp.fc2", "ff_layer.ffn_layer2", Role.FEEDFORWARD, ("hidden_size", "intermediate_size"), "down"),
    ),
    tail=(
        *layer_norm("model.final_layernorm", "params.lm.final_ln", "final_norm"),
        *linear("lm_head", "params.lm.softmax.logits_ffn", Role.EMBEDDING, ("vocab_size", "hidden_size"), "lm_head"),
    ),
    # Names and shapes as MediaPipe's C++ step lays out PHI_2 LoRA: every target, post included,
    # has A as `w_prime_left` [r, in] and B as `w_prime_right` [out, r], written in that order.
    # (Its PhiMapper means to name post's halves the Gemma way round, which its C++ step reads as
    # the other half's shape; 0.10.21 leaves all Phi-2 LoRA tensors unrenamed and then crashes.)
    lora=(
        LoraRule("self_attn.q_proj", "self_attention.q", "w_prime_left", "w_prime_right", "hidden_size", "q_size"),
        LoraRule("self_attn.k_proj", "self_attention.k", "w_prime_left", "w_prime_right", "hidden_size", "kv_size"),
        LoraRule("self_attn.v_proj", "self_attention.v", "w_prime_left", "w_prime_right", "hidden_size", "kv_size"),
        LoraRule("self_attn.dense", "self_attention.post", "w_prime_left", "w_prime_right", "q_size", "hidden_size",
                 swapped_in_mediapipe=True),
    ),
    required_lora=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
    parameters=parameters,
    architecture=ARCHITECTURE,
    lora_float="fp32",  # MediaPipe's C++ step writes Phi-2's LoRA halves as float32 (Gemma's: fp16)
    backends=("gpu", "cpu"),
    # litert-torch's Phi-2: a sequential MLP (fc1 is its w1), LayerNorms with biases, lm_head with bias.
    cpu=CpuGraph("phi.phi2", "get_model_config", "Phi2", params={"up": "transformer_blocks.{i}.ff.w1.weight"},
                 lora=True),
)
