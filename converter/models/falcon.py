"""Falcon-RW: FALCON_RW_1B, Hugging Face `FalconForCausalLM` as falcon-rw-1b configures it.

ALiBi instead of rotary, sequential attention and MLP with LayerNorms (with bias), biases on
every projection, GELU MLP, and the output projection tied to the embedding. The fused
`query_key_value` interleaves q, k and v per head (`[heads, 3, head_dim]` rows); MediaPipe
writes them as three tensors. Its checkpoints are PyTorch `.bin` files.
"""
from __future__ import annotations

from ..proto import llm_params_pb2
from ..proto.transformer_params_pb2 import TransformerParameters as TP
from .base import Architecture, Dims, ModelFamily, ModelType, Role, Split, WeightRule, sized_parameters
from .checks import require, require_close

H = ("hidden_size",)
QKV = ("qkv_size", "hidden_size")
LAYER_NORM_EPS = 1e-5
START_TOKEN_ID = 1
ARCHITECTURE = Architecture(norm_eps=LAYER_NORM_EPS, gelu_approximate="none", gated_mlp=False, position="alibi")


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Falcon-RW checkpoint, matching MediaPipe's for the real size."""
    require(config, "alibi", (True,), False)
    require(config, "parallel_attn", (False,), True)
    require(config, "new_decoder_architecture", (False,), False)
    require(config, "multi_query", (False,), True)
    require(config, "bias", (True,), False)
    require(config, "apply_residual_connection_post_layernorm", (False,), False)
    require(config, "activation", ("gelu",), "gelu")
    require_close(config, "layer_norm_epsilon", LAYER_NORM_EPS)
    # MediaPipe writes the head count as num_kv_heads here, not 0
    params = sized_parameters(dims, START_TOKEN_ID, ["<|endoftext|>"], num_kv_heads=dims.num_kv_heads)
    t = params.transformer_parameters
    t.feed_forward_parameters.CopyFrom(TP.FeedForwardParameters(activation=TP.GELU, pre_norm=TP.LAYER_NORM,
                                                                post_norm=TP.NO_NORM))
    t.final_project_parameters.no_bias = True
    t.pre_norm, t.post_norm, t.final_norm = TP.LAYER_NORM, TP.NO_NORM, TP.LAYER_NORM
    t.self_attention_parameters.CopyFrom(TP.SelfAttentionParameters(
        attention_mask_type=TP.CAUSAL, attention_scale_type=TP.SCALE_TYPE_INV_SQRT_HEAD_DIM))
    return params


def linear(hf: str, mp: str, role: Role, shape: tuple[str, str], slot: str,
           split: Split | None = None) -> tuple[WeightRule, WeightRule]:
    """A projection with bias: `<hf>.weight` -> `<mp>.linear.w`, `<hf>.bias` -> `<mp>.bias.b`."""
    return (WeightRule(f"{hf}.weight", f"{mp}.linear.w", role, shape, slot=slot, split=split),
            WeightRule(f"{hf}.bias", f"{mp}.bias.b", Role.BIAS, shape[:1], slot=f"{slot}.bias", split=split))


def layer_norm(hf: str, mp: str, slot: str) -> tuple[WeightRule, WeightRule]:
    """A LayerNorm: `<hf>.weight` -> `<mp>.scale`, `<hf>.bias` -> `<mp>.bias`."""
    return (WeightRule(f"{hf}.weight", f"{mp}.scale", Role.NORM, H, slot=slot),
            WeightRule(f"{hf}.bias", f"{mp}.bias", Role.NORM, H, slot=f"{slot}.bias"))


def fused_qkv(part: int, name: str) -> tuple[WeightRule, WeightRule]:
    """q, k or v: part `part` of the per-head interleaved `query_key_value` rows."""
    return linear("self_attention.query_key_value", f"self_attention.{name}", Role.ATTENTION, QKV, name,
                  Split(part, 3))


FAMILY = ModelFamily(
    name="falcon",
    hf_model_types=("falcon", "RefinedWebModel"),
    model_types=(ModelType("FALCON_RW_1B", 5, Dims(24, 2048, 8192, 32, 32, 64, 50304), context=2048),),
    head=(
        WeightRule("transformer.word_embeddings.weight", "params.lm.token_embedding.w", Role.EMBEDDING,
                   ("vocab_size", "hidden_size"), lookup_order=True, slot="embedding"),
    ),
    layer=(
        *layer_norm("input_layernorm", "pre_layer_norm", "attn_norm"),
        *fused_qkv(0, "q"),
        *fused_qkv(1, "k"),
        *fused_qkv(2, "v"),
        *linear("self_attention.dense", "self_attention.post", Role.ATTENTION, ("hidden_size", "q_size"), "o"),
        *layer_norm("post_attention_layernorm", "post_layer_norm", "mlp_norm"),  # the MLP's pre-norm
        *linear("mlp.dense_h_to_4h", "ff_layer.ffn_layer1", Role.FEEDFORWARD, ("intermediate_size", "hidden_size"),
                "up"),
        *linear("mlp.dense_4h_to_h", "ff_layer.ffn_layer2", Role.FEEDFORWARD, ("hidden_size", "intermediate_size"),
                "down"),
    ),
    tail=(
        *layer_norm("transformer.ln_f", "params.lm.final_ln", "final_norm"),
        WeightRule("lm_head.weight", "params.lm.softmax.logits_ffn.w", Role.EMBEDDING, ("vocab_size", "hidden_size"),
                   tied="transformer.word_embeddings.weight", slot="lm_head"),
    ),
    lora=(),
    required_lora=(),
    parameters=parameters,
    architecture=ARCHITECTURE,
    layer_prefix="transformer.h.{i}.",
    config_keys={"num_kv_heads": ("num_kv_heads", "num_key_value_heads")},
    text_config=lambda config: {**config, "ffn_hidden_size": config.get("ffn_hidden_size")
                                or 4 * (config.get("hidden_size") or 0)},
)
