"""Qwen 2.5: QWEN2_5_0_5B, QWEN2_5_1_5B, QWEN2_5_3B, Hugging Face `Qwen2ForCausalLM` (CPU only).

Llama 3's layers (llama3.py) with biases on the q, k and v projections, rotary base 1000000 without
scaling, RMSNorm epsilon 1e-6, the output projection tied to the embedding, and an embedding padded
past the tokenizer (151936 rows for 151665 tokens). MediaPipe's GPU runtime has no Qwen model type;
the CPU backend builds litert-torch's Qwen 2.5 graph.
"""
from __future__ import annotations

from typing import Any

from ..proto import llm_params_pb2
from .base import Architecture, CpuGraph, Dims, ModelFamily, ModelType, Role, WeightRule
from .gemma import EMBEDDING, FINAL_NORM, INPUT_NORM, LORA, MLP, REQUIRED_LORA, TIED_LM_HEAD, K, O, Q, V
from .llama3 import BACKENDS, MLP_NORM, check_common, llama_parameters, norm_eps, rope

ROPE_THETA = 1000000.0
NORM_EPS = 1e-6
START_TOKEN_ID = 151643  # <|endoftext|>, config.json's bos_token_id (the tokenizer adds none)
STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")
ARCHITECTURE = Architecture(norm_eps=NORM_EPS, rope_theta=ROPE_THETA, free_head_dim=True)
ROTARY = ("default",)  # Qwen 2.5's configs leave rope_scaling null


def bias(weight: WeightRule) -> WeightRule:
    """The bias of a q/k/v projection rule: `<name>.bias`, one value per output row."""
    return WeightRule(weight.hf.removesuffix(".weight") + ".bias", weight.mp.removesuffix(".w") + ".b", Role.BIAS,
                      weight.shape[:1], slot=f"{weight.slot}.bias")


def parameters(dims: Dims, config: dict) -> llm_params_pb2.LlmParameters:
    """LlmParameters for a Qwen 2.5 checkpoint (start/stop tokens and sizes; checks the config)."""
    check_common(config)
    rope(config, ROTARY)
    return llama_parameters(dims, config, START_TOKEN_ID, STOP_TOKENS, qkv_bias=True)


def configure(model: Any, config: dict) -> None:
    """config.json's settings beyond the sizes on litert-torch's Qwen 2.5 ModelConfig (`CpuGraph.configure`):
    RMSNorm epsilon and rotary base (its q/k/v biases are the example's)."""
    theta, eps = rope(config, ROTARY).theta, norm_eps(config)
    for block in model.block_configs:
        block.attn_config.rotary_base = theta
        block.pre_attention_norm_config.epsilon = block.post_attention_norm_config.epsilon = eps
    model.final_norm_config.epsilon = eps


FAMILY = ModelFamily(
    name="qwen2",
    hf_model_types=("qwen2",),
    model_types=(
        # enum 0: MediaPipe has no Qwen model type (CPU only; nothing is written for the GPU).
        ModelType("QWEN2_5_0_5B", 0, Dims(24, 896, 4864, 14, 2, 64, 151936), context=32768),
        ModelType("QWEN2_5_1_5B", 0, Dims(28, 1536, 8960, 12, 2, 128, 151936), context=32768),
        ModelType("QWEN2_5_3B", 0, Dims(36, 2048, 11008, 16, 2, 128, 151936), context=32768),
    ),
    head=(EMBEDDING,),
    layer=(INPUT_NORM, Q, bias(Q), K, bias(K), V, bias(V), O, MLP_NORM, *MLP),
    tail=(FINAL_NORM,),
    lora=LORA,
    required_lora=REQUIRED_LORA,
    tied_copies=TIED_LM_HEAD,
    parameters=parameters,
    backends=BACKENDS,
    architecture=ARCHITECTURE,
    cpu=CpuGraph("qwen.qwen", "get_0_5b_model_config", "Qwen",
                 params={"mlp_norm": "transformer_blocks.{i}.post_atten_norm.weight"}, lora=True, configure=configure),
)
