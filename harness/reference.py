"""Reference CPU runtime: runs our GPU weight files (and LoRA files) the way the model defines.

Weights are read back exactly as stored (int8/int4 as integers with their scales, see
`linear.py`; LoRA halves as their stored floats) and the forward pass is float32 torch. Nothing here
is specific to a family: tensor names, the part each tensor plays (`WeightRule.slot`) and which LoRA half is A
or B come from the converter's model family data; the family's `Architecture` gives what the
runtime knows from the model type (norm offset and epsilon, embedding scale, GELU flavour,
gated or plain MLP, parallel residual, rotary or ALiBi positions, partial rotary); the file's
LlmParameters give the rest (norm kinds, activation, soft caps, attention scale, QK norm,
sliding window, local/global layers, global rotary base and scaling). The runtime reads what
the converter wrote and nothing else.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from converter.errors import ConversionError
from converter.models import FAMILIES
from converter.models.base import Architecture, Dims, ModelFamily, WeightRule
from converter.proto import llm_params_pb2
from converter.proto.transformer_params_pb2 import TransformerParameters as TP
from converter.plan import LORA_FLOAT_BYTES
from converter.tflite import WeightFile

from .linear import Linear, load_linear

Weights = dict[str, Linear | torch.Tensor]  # matrices as `Linear`, norm scales and biases as tensors
LayerLora = dict[str, tuple[torch.Tensor, torch.Tensor]]  # slot -> (A, B)
NO_LORA: LayerLora = {}


def dims_from_parameters(params: llm_params_pb2.LlmParameters, path: Path) -> Dims:
    """The shapes the file's LlmParameters state, refused (naming the field) when no model has them."""
    t = params.transformer_parameters
    dims = Dims(num_layers=t.num_stacks, hidden_size=t.embedding_dim, intermediate_size=t.hidden_dimension,
                num_heads=t.num_heads, num_kv_heads=t.num_kv_heads or t.num_heads, head_dim=t.head_dimension,
                vocab_size=params.vocab_size)
    fields = (("num_stacks", dims.num_layers), ("embedding_dim", dims.hidden_size),
              ("hidden_dimension", dims.intermediate_size), ("num_heads", dims.num_heads),
              ("num_kv_heads", dims.num_kv_heads), ("head_dimension", dims.head_dim), ("vocab_size", dims.vocab_size))
    for name, value in fields:
        if value < 1:
            raise ConversionError(f"{path}: LlmParameters {name} is {value}, expected at least 1")
    if dims.num_heads % dims.num_kv_heads:
        raise ConversionError(f"{path}: LlmParameters num_kv_heads {dims.num_kv_heads} does not divide "
                              f"num_heads {dims.num_heads}")
    return dims


def check_values(t: TP, path: Path) -> None:
    """Refuse LlmParameters values the forward pass cannot use (they would give NaN or masked-out
    attention, not an error): negative windows or layer patterns, non-finite caps and rotary settings."""
    attention = t.self_attention_parameters
    checks = [("self_attention_parameters.sliding_window_size", attention.sliding_window_size, False),
              ("num_local_layers_per_global", t.num_local_layers_per_global, False),
              ("self_attention_parameters.soft_cap_value", attention.soft_cap_value, False),
              ("final_project_parameters.soft_cap_value", t.final_project_parameters.soft_cap_value, False)]
    checks += [(name, getattr(t, name), True) for name in ("query_rescale_factor", "global_rope_wavelength",
                                                            "global_rope_scaling") if t.HasField(name)]
    for name, value, positive in checks:
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ConversionError(f"{path}: LlmParameters {name} is {value}, expected a finite number "
                                  f"{'> 0' if positive else '>= 0'}")


def family_of(weights: WeightFile) -> ModelFamily:
    for family in FAMILIES:
        if any(t.name == weights.subgraph_name for t in family.model_types):
            return family
    raise ConversionError(f"{weights.path}: the reference runtime does not know model type {weights.subgraph_name}")


def context_of(weights: WeightFile) -> int:
    """The most positions (prompt + output) the model takes: the file's max_seq_length if it states
    one, else its model type's context; 0 if neither is known."""
    stated = weights.parameters.transformer_parameters.max_seq_length
    return stated if stated > 0 else family_of(weights).model_type(weights.subgraph_name).context


def read_rule(base: WeightFile, rule: WeightRule, name: str, dims: Dims) -> Linear | torch.Tensor:
    """A matrix kept as stored (quantized roles) or a raw float32 vector (norm scales, biases), of
    the size the parameters give it."""
    shape = rule.output_shape(dims)
    if rule.role.quantized:
        return load_linear(base, name, *shape)
    return base.vector(name, math.prod(shape))


def slot_of(rule: WeightRule) -> str:
    if not rule.slot:
        raise ConversionError(f"model family rule for {rule.hf} has no slot: the reference runtime cannot place it")
    return rule.slot


@dataclass(frozen=True)
class Adapter:
    """A LoRA weights file's matrices, one `LayerLora` per layer: kept apart from the base weights and
    added to the base's products (`x W^T + (x A^T) B^T`) by the model that holds it."""

    path: Path
    layers: tuple[LayerLora, ...]


@dataclass
class Layer:
    weights: Weights  # by slot: q, k, v, o, gate, up, down, norms, "<slot>.bias"

    def linear(self, slot: str, x: torch.Tensor, lora: LayerLora = NO_LORA) -> torch.Tensor:
        y = self.weights[slot](x)
        if f"{slot}.bias" in self.weights:
            y = y + self.weights[f"{slot}.bias"]
        if slot in lora:
            a, b = lora[slot]
            y = y + (x @ a.T) @ b.T
        return y


def normalize(kind: int, x: torch.Tensor, weights: Weights, slot: str, arch: Architecture) -> torch.Tensor:
    """Apply a TransformerParameters.Norm over the last axis with the slot's scale (and bias)."""
    if kind in (TP.NO_NORM, TP.NORM_UNSPECIFIED):
        return x
    if kind == TP.LAYER_NORM:
        return F.layer_norm(x, x.shape[-1:], weights[slot], weights.get(f"{slot}.bias"), arch.norm_eps)
    normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + arch.norm_eps)
    if kind == TP.RMS_NORM_NO_SCALE:
        return normalized
    if kind == TP.RMS_NORM:
        return normalized * (arch.norm_offset + weights[slot])
    raise ConversionError(f"the reference runtime does not implement norm type {TP.Norm.Name(kind)}")


def activation(kind: int, arch: Architecture):
    if kind == TP.GELU:
        return lambda x: F.gelu(x, approximate=arch.gelu_approximate)
    if kind == TP.SILU:
        return F.silu
    if kind == TP.RELU:
        return F.relu
    raise ConversionError(f"the reference runtime does not implement activation {TP.Activation.Name(kind)}")


def attention_scale(dims: Dims, params: TP) -> float:
    attention = params.self_attention_parameters
    kind = attention.attention_scale_type if attention.HasField("attention_scale_type") else TP.SCALE_TYPE_INV_SQRT_HEAD_DIM
    if kind == TP.SCALE_TYPE_INV_SQRT_HEAD_DIM:
        return 1.0 / math.sqrt(dims.head_dim)
    if kind == TP.SCALE_TYPE_INV_SQRT_D_MODEL_DIV_NUM_HEADS:
        return 1.0 / math.sqrt(dims.hidden_size / dims.num_heads)
    if kind == TP.SCALE_TYPE_RESCALE_FACTOR_INV_HEAD_DIM:
        return params.query_rescale_factor / dims.head_dim
    raise ConversionError(f"the reference runtime does not implement {TP.AttentionScaleType.Name(kind)}")


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """`cap * tanh(x / cap)`; a cap <= 0 is off."""
    return cap * torch.tanh(x / cap) if cap > 0 else x


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi head slopes (geometric from 2^(-8/n); interleaved extra heads when n is not a power of 2)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, closest + 1, dtype=torch.float32)
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = extra_base ** torch.arange(1, 2 * (num_heads - closest), 2, dtype=torch.float32)
        slopes = torch.cat([slopes, extra])
    return slopes


@dataclass(frozen=True)
class LayerKind:
    """What differs between layers: rotary base and scaling, and the attention window (0: all)."""

    rope_theta: float
    rope_scaling: float
    window: int


class ReferenceModel:
    """The forward pass a family's data and the file's LlmParameters describe, over a base weights
    file and an optional LoRA weights file (its `adapter`; `with_adapter` switches it without
    reading the base again)."""

    def __init__(self, base: WeightFile, lora: WeightFile | None = None):
        self.family = family_of(base)
        self.base_type = base.subgraph_name
        self.arch = self.family.architecture
        self.parameters = base.parameters
        self.t = self.parameters.transformer_parameters
        self.dims = d = dims_from_parameters(self.parameters, base.path)
        check_values(self.t, base.path)
        self.context = context_of(base)
        self.globals: Weights = {}
        for rule in self.family.head + self.family.tail:
            self.globals[slot_of(rule)] = read_rule(base, rule, rule.mp, d)
        self.layers = []
        for i in range(d.num_layers):
            prefix = self.family.mp_layer_prefix.format(i=i)
            self.layers.append(Layer({slot_of(rule): read_rule(base, rule, prefix + rule.mp, d)
                                      for rule in self.family.layer}))
        self.kinds = [self._layer_kind(i) for i in range(d.num_layers)]
        self.scale = attention_scale(d, self.t)
        self.act = activation(self.t.feed_forward_parameters.activation, self.arch)
        self.adapter = self.read_adapter(lora) if lora is not None else None

    def with_adapter(self, adapter: Adapter | None) -> ReferenceModel:
        """This model with `adapter` (None: the base alone): a view that shares every base weight,
        so switching adapters copies and reads nothing."""
        view = copy.copy(self)
        view.adapter = adapter
        return view

    def _layer_kind(self, index: int) -> LayerKind:
        """Gemma 3's pattern: `num_local_layers_per_global` sliding-window layers, then one global layer
        with the global rotary base; without the pattern every layer is alike."""
        window = self.t.self_attention_parameters.sliding_window_size
        local = self.t.num_local_layers_per_global
        if local and (index + 1) % (local + 1) == 0:
            theta = self.t.global_rope_wavelength if self.t.HasField("global_rope_wavelength") else self.arch.rope_theta
            scaling = self.t.global_rope_scaling if self.t.HasField("global_rope_scaling") else 1.0
            return LayerKind(theta, scaling, 0)
        return LayerKind(self.arch.rope_theta, 1.0, window)

    def read_adapter(self, lora: WeightFile) -> Adapter:
        """A LoRA weights file's matrices, checked against this base (model type, dimensions, sizes)."""
        rank = lora.lora_rank
        if rank is None:
            raise ConversionError(f"--lora {lora.path}: a base model's weights file, not a LoRA weights file")
        if lora.subgraph_name != self.base_type:
            raise ConversionError(f"--lora {lora.path} was converted for model type {lora.subgraph_name}, "
                                  f"the model is {self.base_type}")
        if lora.parameters.transformer_parameters != self.t:
            theirs = dims_from_parameters(lora.parameters, lora.path)
            differ = [f"{name} {getattr(theirs, name)} vs {getattr(self.dims, name)}"
                      for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                                   "head_dim") if getattr(theirs, name) != getattr(self.dims, name)]
            raise ConversionError(f"--lora {lora.path} was converted for another model "
                                  f"({', '.join(differ) or 'its transformer parameters differ'})")
        if not isinstance(rank, int) or rank < 1:
            raise ConversionError(f"--lora {lora.path}: LoRA rank {rank!r} in its metadata, expected at least 1")
        d = self.dims
        itemsize = LORA_FLOAT_BYTES[self.family.lora_float]
        slots = {rule.hf.removesuffix(".weight"): slot_of(rule) for rule in self.family.layer}
        layers: list[LayerLora] = []
        for i in range(d.num_layers):
            layer: LayerLora = {}
            layers.append(layer)
            prefix = self.family.mp_layer_prefix.format(i=i)
            for rule in self.family.lora:
                a_name, b_name = f"{prefix}{rule.mp}.{rule.a_name}", f"{prefix}{rule.mp}.{rule.b_name}"
                if a_name not in lora.tensors and b_name not in lora.tensors:
                    continue
                in_features, out_features = getattr(d, rule.in_features), getattr(d, rule.out_features)
                for name, rows, cols in ((a_name, rank, in_features), (b_name, out_features, rank)):
                    entry = lora.tensors.get(name)
                    if entry is None or entry.nbytes != rows * cols * itemsize:
                        found = "is missing" if entry is None else f"has {entry.nbytes} bytes"
                        raise ConversionError(f"--lora {lora.path}: tensor {name} {found}, expected a [{rows}, {cols}] "
                                              f"{self.family.lora_float} matrix (rank {rank} in its metadata)")
                layer[slots[rule.hf_module]] = (lora.matrix(a_name, rank, in_features),
                                                lora.matrix(b_name, out_features, rank))
        if not any(layers):
            raise ConversionError(f"--lora {lora.path}: no LoRA tensor of a {self.base_type} model in it")
        return Adapter(lora.path, tuple(layers))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, kind: LayerKind) -> torch.Tensor:
        """Rotate-half rotary embedding on the first `rotary_fraction` of each head."""
        rotary = int(self.dims.head_dim * self.arch.rotary_fraction)
        half = rotary // 2
        inv_freq = 1.0 / (kind.rope_theta ** (torch.arange(0, half, dtype=torch.float32) * 2 / rotary))
        angles = (positions[:, None].float() / kind.rope_scaling) * inv_freq[None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        head, rest = x[..., :rotary], x[..., rotary:]
        rotated = torch.cat([-head[..., half:], head[..., :half]], -1)
        return torch.cat([head * cos[None] + rotated * sin[None], rest], -1)

    def _attention(self, layer: Layer, lora: LayerLora, x: torch.Tensor, positions: torch.Tensor, kind: LayerKind,
                   cached: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple]:
        d, t = self.dims, self.t
        q = layer.linear("q", x, lora).view(-1, d.num_heads, d.head_dim).transpose(0, 1)
        k = layer.linear("k", x, lora).view(-1, d.num_kv_heads, d.head_dim).transpose(0, 1)
        v = layer.linear("v", x, lora).view(-1, d.num_kv_heads, d.head_dim).transpose(0, 1)
        if t.self_attention_parameters.qk_norm:
            q = normalize(TP.RMS_NORM, q, layer.weights, "q_norm", self.arch)
            k = normalize(TP.RMS_NORM, k, layer.weights, "k_norm", self.arch)
        if self.arch.position == "rope":
            q, k = self._rope(q, positions, kind), self._rope(k, positions, kind)
        if cached is not None:
            k, v = torch.cat([cached[0], k], 1), torch.cat([cached[1], v], 1)
        groups = d.num_heads // d.num_kv_heads
        keys, values = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        scores = q @ keys.transpose(1, 2)
        key_positions = torch.arange(keys.shape[1])
        if self.arch.position == "alibi":
            scores = scores + alibi_slopes(d.num_heads)[:, None, None] * key_positions[None, None, :]
        scores = soft_cap(scores * self.scale, t.self_attention_parameters.soft_cap_value)
        distance = positions[:, None] - key_positions[None, :]
        allowed = (distance >= 0) & ((distance < kind.window) if kind.window else True)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attention = (scores.softmax(-1) @ values).transpose(0, 1).reshape(len(positions), -1)
        return layer.linear("o", attention, lora), (k, v)

    def _mlp(self, layer: Layer, lora: LayerLora, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(layer.linear("gate", x, lora)) * layer.linear("up", x, lora) if self.arch.gated_mlp \
            else self.act(layer.linear("up", x, lora))
        return layer.linear("down", hidden, lora)

    def forward(self, ids: list[int], cache: list | None = None, hidden: list[torch.Tensor] | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, list]:
        """Logits `[len(ids), vocab]` for new tokens `ids` (`[1, vocab]` for the last one only with
        `last_only`: what generation needs), extending the KV `cache`. A `hidden` list receives the
        hidden states: the (scaled) embeddings, each layer's output, the final norm's."""
        record = hidden.append if hidden is not None else lambda _: None
        d, t, arch = self.dims, self.t, self.arch
        ff = t.feed_forward_parameters
        cache = cache if cache is not None else [None] * d.num_layers
        start = 0 if cache[0] is None else cache[0][0].shape[1]
        positions = torch.arange(start, start + len(ids))
        h = self.globals["embedding"].rows(torch.tensor(ids))
        if arch.scale_embedding:
            h = h * math.sqrt(d.hidden_size)
        record(h)
        loras = self.adapter.layers if self.adapter is not None else (NO_LORA,) * d.num_layers
        for index, (layer, lora) in enumerate(zip(self.layers, loras, strict=True)):
            x = normalize(t.pre_norm, h, layer.weights, "attn_norm", arch)
            attention, cache[index] = self._attention(layer, lora, x, positions, self.kinds[index], cache[index])
            attention = normalize(t.post_norm, attention, layer.weights, "attn_post_norm", arch)
            if arch.parallel_residual:
                mlp_input = x if ff.pre_norm in (TP.NO_NORM, TP.NORM_UNSPECIFIED) \
                    else normalize(ff.pre_norm, h, layer.weights, "mlp_norm", arch)
                h = h + attention + normalize(ff.post_norm, self._mlp(layer, lora, mlp_input), layer.weights,
                                              "mlp_post_norm", arch)
            else:
                h = h + attention
                mlp = self._mlp(layer, lora, normalize(ff.pre_norm, h, layer.weights, "mlp_norm", arch))
                h = h + normalize(ff.post_norm, mlp, layer.weights, "mlp_post_norm", arch)
            record(h)
        h = normalize(t.final_norm, h[-1:] if last_only else h, self.globals, "final_norm", arch)
        record(h)
        output = self.globals.get("lm_head", self.globals["embedding"])
        logits = output(h)
        if "lm_head.bias" in self.globals:
            logits = logits + self.globals["lm_head.bias"]
        return soft_cap(logits, t.final_project_parameters.soft_cap_value), cache
