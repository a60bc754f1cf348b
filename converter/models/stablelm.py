"""StableLM: STABLELM_4E1T_3B, Hugging Face `StableLmForCausalLM`.

LayerNorms with bias, no projection biases, SiLU-gated MLP, rotary on the first 25% of each
head (base 10000), sequential residuals, an untied `lm_head`.
"""
from __future__ import annotations

from ..proto import llm_params_pb2
from ..proto.transformer_params_pb2 import TransformerParameters as TP
from .base import Architecture, Dims, ModelFamily, ModelType, Role, WeightRule, sized_parameters
from .checks import require, require_close

H = ("hidden_size",)
PARTIAL_ROTARY_FACTOR = 0.25  # what the runtime applies for STABLELM_4E1T_3B (not in LlmParameters)
LAYER_NORM_EPS = 1e-5
START_TOKEN_ID = 0
ARCHITECTURE = Architecture(norm_eps=LAYER_NORM_EPS, rotary_fraction=PARTIAL_ROTARY_FACTOR)


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a StableLM checkpoint, matching MediaPipe's for the real size."""
    require(config, "hidden_act", ("silu",), "silu")
    require_close(config, "partial_rotary_factor", PARTIAL_ROTARY_FACTOR)
    require_close(config, "layer_norm_eps", LAYER_NORM_EPS)
    require_close(config, "rope_theta", 10000.0)
    require(config, "rope_scaling", (None,), None)
    require(config, "rope_type", ("default",), "default")
    require(config, "use_qkv_bias", (False,), False)
    require(config, "qk_layernorm", (False,), False)
    require(config, "use_parallel_residual", (False,), False)
    params = sized_parameters(dims, START_TOKEN_ID, ["<|endoftext|>"])
    t = params.transformer_parameters
    t.feed_forward_parameters.CopyFrom(TP.FeedForwardParameters(no_bias=True, activation=TP.SILU,
                                                                pre_norm=TP.LAYER_NORM, post_norm=TP.NO_NORM))
    t.final_project_parameters.no_bias = True
    t.pre_norm, t.post_norm, t.final_norm = TP.LAYER_NORM, TP.NO_NORM, TP.LAYER_NORM
    t.self_attention_parameters.CopyFrom(TP.SelfAttentionParameters(
        qkv_no_bias=True, post_proj_no_bias=True, attention_mask_type=TP.CAUSAL,
        attention_scale_type=TP.SCALE_TYPE_INV_SQRT_HEAD_DIM))
    return params


FAMILY = ModelFamily(
    name="stablelm",
    hf_model_types=("stablelm", "stablelm_epoch"),
    model_types=(ModelType("STABLELM_4E1T_3B", 8, Dims(32, 2560, 6912, 32, 32, 80, 50304), context=4096),),
    head=(
        WeightRule("model.embed_tokens.weight", "params.lm.token_embedding.w", Role.EMBEDDING,
                   ("vocab_size", "hidden_size"), lookup_order=True, slot="embedding"),
    ),
    layer=(
        WeightRule("input_layernorm.weight", "pre_layer_norm.scale", Role.NORM, H, slot="attn_norm"),
        WeightRule("input_layernorm.bias", "pre_layer_norm.bias", Role.NORM, H, slot="attn_norm.bias"),
        WeightRule("self_attn.q_proj.weight", "self_attention.q.w", Role.ATTENTION, ("q_size", "hidden_size"),
                   slot="q"),
        WeightRule("self_attn.k_proj.weight", "self_attention.k.w", Role.ATTENTION, ("kv_size", "hidden_size"),
                   slot="k"),
        WeightRule("self_attn.v_proj.weight", "self_attention.v.w", Role.ATTENTION, ("kv_size", "hidden_size"),
                   slot="v"),
        WeightRule("self_attn.o_proj.weight", "self_attention.post.w", Role.ATTENTION, ("hidden_size", "q_size"),
                   slot="o"),
        WeightRule("post_attention_layernorm.weight", "post_layer_norm.scale", Role.NORM, H,
                   slot="mlp_norm"),  # the MLP's pre-norm
        WeightRule("post_attention_layernorm.bias", "post_layer_norm.bias", Role.NORM, H,
                   slot="mlp_norm.bias"),
        WeightRule("mlp.gate_proj.weight", "ff_layer.ffn_layer1_gate.w", Role.FEEDFORWARD,
                   ("intermediate_size", "hidden_size"), slot="gate"),
        WeightRule("mlp.up_proj.weight", "ff_layer.ffn_layer1.w", Role.FEEDFORWARD,
                   ("intermediate_size", "hidden_size"), slot="up"),
        WeightRule("mlp.down_proj.weight", "ff_layer.ffn_layer2.w", Role.FEEDFORWARD,
                   ("hidden_size", "intermediate_size"), slot="down"),
    ),
    tail=(
        WeightRule("model.norm.weight", "params.lm.final_ln.scale", Role.NORM, H, slot="final_norm"),
        WeightRule("model.norm.bias", "params.lm.final_ln.bias", Role.NORM, H, slot="final_norm.bias"),
        WeightRule("lm_head.weight", "params.lm.softmax.logits_ffn.w", Role.EMBEDDING, ("vocab_size", "hidden_size"),
                   slot="lm_head"),
    ),
    lora=(),
    required_lora=(),
    parameters=parameters,
    architecture=ARCHITECTURE,
)
