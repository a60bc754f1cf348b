"""Gemma (1st generation): GEMMA_2B and GEMMA_7B, Hugging Face `GemmaForCausalLM`.

Tied embeddings (one `logits_ffn.w` serves lookup and output), RMSNorm stored as in the
checkpoint (the runtime adds Gemma's `1 + w`), GELU-gated MLP, no biases, rotary base 10000.
"""
from __future__ import annotations

from ..errors import ConversionError
from ..proto import llm_params_pb2
from ..proto.transformer_params_pb2 import TransformerParameters as TP
from .base import Dims, LoraRule, ModelFamily, ModelType, Role, WeightRule, is_close, kv_heads_field, rope_theta

H = ("hidden_size",)
GELU_NAMES = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Gemma checkpoint, matching MediaPipe's for the real sizes."""
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in GELU_NAMES:
        raise ConversionError(f"config.json: hidden_activation {activation!r} is not supported (expected a GELU)")
    if not is_close(rope_theta(config), 10000.0):
        raise ConversionError(f"config.json: rope_theta {rope_theta(config)} is not supported (runtime uses 10000)")
    if config.get("rope_scaling"):
        raise ConversionError("config.json: rope_scaling is not supported by the runtime")
    params = llm_params_pb2.LlmParameters(vocab_size=dims.vocab_size, start_token_id=2, stop_tokens=["<eos>"])
    t = params.transformer_parameters
    t.batch_size = 1
    t.embedding_dim = dims.hidden_size
    t.hidden_dimension = dims.intermediate_size
    t.head_dimension = dims.head_dim
    t.num_heads = dims.num_heads
    t.num_stacks = dims.num_layers
    t.num_kv_heads = kv_heads_field(dims)
    t.feed_forward_parameters.CopyFrom(
        TP.FeedForwardParameters(no_bias=True, activation=TP.GELU, pre_norm=TP.RMS_NORM, post_norm=TP.NO_NORM)
    )
    t.final_project_parameters.no_bias = True
    t.pre_norm, t.post_norm, t.final_norm = TP.RMS_NORM, TP.NO_NORM, TP.RMS_NORM
    t.self_attention_parameters.CopyFrom(
        TP.SelfAttentionParameters(
            qkv_no_bias=True, post_proj_no_bias=True, attention_mask_type=TP.CAUSAL,
            attention_scale_type=TP.SCALE_TYPE_INV_SQRT_HEAD_DIM,
        )
    )
    t.skip_absolute_positional_embeddings = True
    t.load_per_layer_embedding_dynamically = True
    t.load_ngrammer_embedding_dynamically = True
    return params


FAMILY = ModelFamily(
    name="gemma",
    hf_model_types=("gemma",),
    model_types=(
        ModelType("GEMMA_2B", 6, Dims(18, 2048, 16384, 8, 1, 256, 256000)),
        ModelType("GEMMA_7B", 12, Dims(28, 3072, 24576, 16, 16, 256, 256000)),
    ),
    head=(
        WeightRule("model.embed_tokens.weight", "params.lm.softmax.logits_ffn.w", Role.EMBEDDING,
                   ("vocab_size", "hidden_size"), lookup_order=True),
    ),
    layer=(
        WeightRule("input_layernorm.weight", "pre_layer_norm.scale", Role.NORM, H),
        WeightRule("self_attn.q_proj.weight", "self_attention.q.w", Role.ATTENTION, ("q_size", "hidden_size")),
        WeightRule("self_attn.k_proj.weight", "self_attention.k.w", Role.ATTENTION, ("kv_size", "hidden_size")),
        WeightRule("self_attn.v_proj.weight", "self_attention.v.w", Role.ATTENTION, ("kv_size", "hidden_size")),
        WeightRule("self_attn.o_proj.weight", "self_attention.post.w", Role.ATTENTION, ("hidden_size", "q_size")),
        WeightRule("post_attention_layernorm.weight", "ff_layer.pre_layer_norm.scale", Role.NORM, H),
        WeightRule("mlp.gate_proj.weight", "ff_layer.ffn_layer1_gate.w", Role.FEEDFORWARD,
                   ("intermediate_size", "hidden_size")),
        WeightRule("mlp.up_proj.weight", "ff_layer.ffn_layer1.w", Role.FEEDFORWARD,
                   ("intermediate_size", "hidden_size")),
        WeightRule("mlp.down_proj.weight", "ff_layer.ffn_layer2.w", Role.FEEDFORWARD,
                   ("hidden_size", "intermediate_size")),
    ),
    tail=(WeightRule("model.norm.weight", "params.lm.final_ln.scale", Role.NORM, H),),
    lora=(
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
    ),
    required_lora=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ignored=("lm_head.weight",),
    parameters=parameters,
)
