"""Gemma 2: GEMMA2_2B, Hugging Face `Gemma2ForCausalLM`.

Gemma plus a norm on each block's output (`post_attention_layernorm` on the attention output,
`post_feedforward_layernorm` on the MLP output; the MLP input norm is `pre_feedforward_layernorm`),
tanh soft caps on the attention logits (50) and the final logits (30), and queries scaled by
1/sqrt(query_pre_attn_scalar). MediaPipe (0.10.21 and later) leaves the local/global alternation
and the 4096 sliding window unset for GEMMA2_2B, so its runtime attends globally in every layer:
the same as transformers for sequences up to the window.
"""
from __future__ import annotations

from ..proto import llm_params_pb2
from typing import Any

from .base import CpuGraph, Dims, ModelFamily, ModelType
from .values import integer
from .gemma import (ARCHITECTURE, EMBEDDING, FINAL_NORM, INPUT_NORM, LORA, MLP, REQUIRED_LORA, TIED_LM_HEAD, K, O, Q,
                    V, attention_scale_type, base_parameters, check_common, check_cpu_query_scale, norm, soft_cap)

# transformers' Gemma2Config defaults, for config.json files that leave them out.
DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Gemma 2 checkpoint, matching MediaPipe's for GEMMA2_2B."""
    check_common(config)
    integer(config, "sliding_window", 4096)  # checked, not written: the runtime leaves the window off (see above)
    caps = {key: soft_cap(config, key, default) for key, default in DEFAULTS.items()}
    return base_parameters(dims, post_norms=True, attention_cap=caps["attn_logit_softcapping"],
                           final_cap=caps["final_logit_softcapping"], scale_type=attention_scale_type(dims, config))


def configure_cpu(model_config: Any, config: dict) -> None:
    """litert-torch's Gemma 2 graph: the checkpoint's soft caps (with the mask given as an input it
    attends globally in every layer, like the GPU runtime, see above)."""
    check_cpu_query_scale(config, model_config.block_config(0).attn_config.head_dim)
    caps = {key: soft_cap(config, key, default) or None for key, default in DEFAULTS.items()}
    for block in model_config.block_configs:
        block.attn_config.logit_softcap = caps["attn_logit_softcapping"]
    model_config.final_logit_softcap = caps["final_logit_softcapping"]


# litert-torch's Gemma 2 and 3 blocks: the attention output norm is the block's `post_atten_norm`,
# the MLP's norms live in its feed-forward module.
CPU_NORMS = {"attn_post_norm": "transformer_blocks.{i}.post_atten_norm.weight",
             "mlp_norm": "transformer_blocks.{i}.ff.pre_ff_norm.weight",
             "mlp_post_norm": "transformer_blocks.{i}.ff.post_ff_norm.weight"}

POST_NORMS_LAYER = (
    INPUT_NORM, Q, K, V, O,
    norm("post_attention_layernorm", "post_layer_norm.scale", "attn_post_norm"),
    norm("pre_feedforward_layernorm", "ff_layer.pre_layer_norm.scale", "mlp_norm"),
    *MLP,
    norm("post_feedforward_layernorm", "ff_layer.post_layer_norm.scale", "mlp_post_norm"),
)

FAMILY = ModelFamily(
    name="gemma2",
    hf_model_types=("gemma2",),
    model_types=(ModelType("GEMMA2_2B", 18, Dims(26, 2304, 9216, 8, 4, 256, 256000), context=8192),),
    head=(EMBEDDING,),
    layer=POST_NORMS_LAYER,
    tail=(FINAL_NORM,),
    lora=LORA,
    required_lora=REQUIRED_LORA,
    tied_copies=TIED_LM_HEAD,
    parameters=parameters,
    architecture=ARCHITECTURE,
    backends=("gpu", "cpu"),
    cpu=CpuGraph("gemma.gemma2", "get_model_config_2b", "Gemma2", params=CPU_NORMS, configure=configure_cpu,
                 lora=True),
)
