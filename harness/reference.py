"""Reference CPU runtime: runs our GPU weight files (and LoRA files) the way the model defines.

Weights are read back exactly as stored (int8/int4 as integers with their scales, fp16 LoRA
halves as fp16 values) and the forward pass is float32 torch. Tensor names and which LoRA half
is A or B come from the converter's model family data, so the runtime reads what the converter
wrote and nothing else. Gemma (1st generation) is the architecture implemented here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from converter.errors import ConversionError
from converter.models import FAMILIES
from converter.models.base import Dims, ModelFamily
from converter.proto import llm_params_pb2
from converter.tflite import WeightFile

from .linear import Linear, load_linear

ROPE_THETA = 10000.0  # the GPU runtime's rotary base for Gemma
RMS_EPS = 1e-6


def dims_from_parameters(params: llm_params_pb2.LlmParameters) -> Dims:
    t = params.transformer_parameters
    return Dims(num_layers=t.num_stacks, hidden_size=t.embedding_dim, intermediate_size=t.hidden_dimension,
                num_heads=t.num_heads, num_kv_heads=t.num_kv_heads or t.num_heads, head_dim=t.head_dimension,
                vocab_size=params.vocab_size)


def family_of(weights: WeightFile) -> ModelFamily:
    for family in FAMILIES:
        if any(t.name == weights.subgraph_name for t in family.model_types):
            return family
    raise ConversionError(f"{weights.path}: the reference runtime does not know model type {weights.subgraph_name}")


@dataclass
class Layer:
    weights: dict[str, Linear | torch.Tensor]  # HF-style short names: q, k, v, o, gate, up, down, norms
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = self.weights[name](x)
        if name in self.lora:
            a, b = self.lora[name]
            y = y + (x @ a.T) @ b.T
        return y


SHORT = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
         "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
         "input_layernorm": "input_norm", "post_attention_layernorm": "post_norm"}


class ReferenceModel:
    """A Gemma forward pass over a base weights file and an optional LoRA weights file."""

    def __init__(self, base: WeightFile, lora: WeightFile | None = None):
        self.family = family_of(base)
        self.dims = dims_from_parameters(base.parameters)
        self.parameters = base.parameters
        d = self.dims
        head = self.family.head[0]
        self.embedding = load_linear(base, head.mp, *d.shape(head.shape), lookup=True)
        self.final_norm = base.vector(self.family.tail[0].mp)
        self.layers = []
        for i in range(d.num_layers):
            prefix = self.family.mp_layer_prefix.format(i=i)
            weights = {}
            for rule in self.family.layer:
                short = SHORT[rule.hf.removesuffix(".weight")]
                shape = d.shape(rule.shape)
                weights[short] = load_linear(base, prefix + rule.mp, *shape) if len(shape) == 2 else base.vector(prefix + rule.mp)
            self.layers.append(Layer(weights))
        if lora is not None:
            self._attach_lora(lora)

    def _attach_lora(self, lora: WeightFile) -> None:
        rank = lora.lora_rank
        if rank is None:
            raise ConversionError(f"{lora.path} is not a LoRA weights file")
        if lora.parameters.transformer_parameters != self.parameters.transformer_parameters:
            raise ConversionError(f"{lora.path} was converted for another model")
        d = self.dims
        for i, layer in enumerate(self.layers):
            prefix = self.family.mp_layer_prefix.format(i=i)
            for rule in self.family.lora:
                a_name, b_name = f"{prefix}{rule.mp}.{rule.a_name}", f"{prefix}{rule.mp}.{rule.b_name}"
                if a_name not in lora.tensors:
                    continue
                in_features, out_features = getattr(d, rule.in_features), getattr(d, rule.out_features)
                a = lora.matrix(a_name, rank, in_features)
                b = lora.matrix(b_name, out_features, rank)
                layer.lora[SHORT[rule.hf_module]] = (a, b)

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * (1.0 + weight)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        half = self.dims.head_dim // 2
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, half, dtype=torch.float32) * 2 / self.dims.head_dim))
        angles = positions[:, None].float() * inv_freq[None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[None] + rotated * sin[None]

    def forward(self, ids: list[int], cache: list | None = None,
                hidden: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list]:
        """Logits `[len(ids), vocab]` for new tokens `ids`, extending the KV `cache`. A `hidden`
        list receives the hidden states: the scaled embeddings, each layer's output, the final norm's."""
        record = hidden.append if hidden is not None else lambda _: None
        d = self.dims
        cache = cache if cache is not None else [None] * d.num_layers
        start = 0 if cache[0] is None else cache[0][0].shape[1]
        positions = torch.arange(start, start + len(ids))
        h = self.embedding.rows(torch.tensor(ids)) * math.sqrt(d.hidden_size)
        record(h)
        groups = d.num_heads // d.num_kv_heads
        for index, layer in enumerate(self.layers):
            x = self._rms_norm(h, layer.weights["input_norm"])
            q = layer.linear("q", x).view(-1, d.num_heads, d.head_dim).transpose(0, 1)
            k = layer.linear("k", x).view(-1, d.num_kv_heads, d.head_dim).transpose(0, 1)
            v = layer.linear("v", x).view(-1, d.num_kv_heads, d.head_dim).transpose(0, 1)
            q, k = self._rope(q, positions), self._rope(k, positions)
            if cache[index] is not None:
                k, v = torch.cat([cache[index][0], k], 1), torch.cat([cache[index][1], v], 1)
            cache[index] = (k, v)
            k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
            scores = q @ k.transpose(1, 2) / math.sqrt(d.head_dim)
            mask = torch.ones(len(ids), k.shape[1], dtype=torch.bool).tril(k.shape[1] - len(ids))
            scores = scores.masked_fill(~mask, float("-inf"))
            attention = (scores.softmax(-1) @ v).transpose(0, 1).reshape(len(ids), -1)
            h = h + layer.linear("o", attention)
            x = self._rms_norm(h, layer.weights["post_norm"])
            h = h + layer.linear("down", F.gelu(layer.linear("gate", x), approximate="tanh") * layer.linear("up", x))
            record(h)
        h = self._rms_norm(h, self.final_norm)
        record(h)
        return self.embedding(h), cache
