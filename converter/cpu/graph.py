"""The family's litert-torch model, sized from config.json and loaded with the planned tensors."""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from ..errors import ConversionError
from ..models.base import CpuGraph
from ..plan import ConversionPlan, PlannedTensor, _expand
from .litert import example

# Where each slot's tensor goes in litert-torch's decoder models ("{i}": the layer); a family's
# `CpuGraph.params` adds or overrides entries. q, k and v are fused into one projection.
COMMON_PARAMS = {
    "embedding": "tok_embedding.weight",
    "lm_head": "lm_head.weight",
    "final_norm": "final_norm.weight",
    "attn_norm": "transformer_blocks.{i}.pre_atten_norm.weight",
    "o": "transformer_blocks.{i}.atten_func.output_projection.weight",
    "q_norm": "transformer_blocks.{i}.atten_func.query_norm.weight",
    "k_norm": "transformer_blocks.{i}.atten_func.key_norm.weight",
    "gate": "transformer_blocks.{i}.ff.w1.weight",
    "up": "transformer_blocks.{i}.ff.w3.weight",
    "down": "transformer_blocks.{i}.ff.w2.weight",
}
QKV = "transformer_blocks.{i}.atten_func.qkv_projection.weight"


def _cpu(plan: ConversionPlan) -> CpuGraph:
    if plan.family.cpu is None:
        raise ConversionError(f"--backend cpu is not supported for {plan.model_type.name}: litert-torch has no "
                              f"graph for the {plan.family.name} family here; use --backend gpu")
    return plan.family.cpu


def model_config(plan: ConversionPlan, kv_cache_size: int) -> Any:
    """The example's ModelConfig with the checkpoint's sizes (layers repeat the example's pattern)."""
    graph, dims = _cpu(plan), plan.dims
    config = getattr(example(graph.example), graph.config)()
    blocks = config.block_configs if isinstance(config.block_configs, list) else [config.block_configs]
    config.block_configs = [copy.deepcopy(blocks[i % len(blocks)]) for i in range(dims.num_layers)]
    config.num_layers, config.vocab_size, config.embedding_dim = dims.num_layers, dims.vocab_size, dims.hidden_size
    config.max_seq_len = kv_cache_size
    if config.embedding_scale is not None:
        config.embedding_scale = dims.hidden_size ** 0.5
    for block in config.block_configs:
        attention = block.attn_config
        attention.num_heads, attention.head_dim = dims.num_heads, dims.head_dim
        attention.num_query_groups = dims.num_kv_heads
        block.ff_config.intermediate_size = dims.intermediate_size
    if graph.configure is not None:
        graph.configure(config, plan.hf_config)
    return config


def build_model(plan: ConversionPlan, config: Any) -> torch.nn.Module:
    graph = _cpu(plan)
    model_class = getattr(example(graph.example), graph.model)
    with torch.device("meta"):
        model = model_class(config)
    return model


Rows = tuple[tuple[str, int, int], ...]  # (checkpoint tensor, first row, end row), stacked in order


def _whole(item: PlannedTensor) -> tuple[str, int, int]:
    assert item.source is not None  # base tensors always have one
    return item.source, 0, item.shape[0]


def _fused_rows(attention: Any, q: PlannedTensor, k: PlannedTensor, v: PlannedTensor) -> Rows:
    """q, k and v as litert-torch's fused projection splits them: whole (q heads, k heads, v heads)
    when it splits heads before groups (`qkv_transpose_before_split`, Gemma 2 and 3) or is not
    interleaved, else per KV group (q heads of the group, its k, its v)."""
    if attention.qkv_transpose_before_split or not attention.qkv_fused_interleaved:
        return _whole(q), _whole(k), _whole(v)
    groups = attention.num_query_groups
    return tuple((name, g * (stop // groups), (g + 1) * (stop // groups))
                 for g in range(groups) for name, _, stop in map(_whole, (q, k, v)))


def planned_slots(plan: ConversionPlan) -> dict[tuple[int | None, str], PlannedTensor]:
    """Every planned base tensor by (layer, slot); layer None for the model's own tensors."""
    by_name = {spec.name: item for item in plan.base for spec in item.outputs}
    slots: dict[tuple[int | None, str], PlannedTensor] = {}
    family = plan.family
    for layer, rules in [(None, family.head + family.tail)] + [(i, family.layer) for i in range(plan.dims.num_layers)]:
        for rule in rules:
            slots[(layer, rule.slot)] = by_name[_expand(rule, layer, family)[1]]
    return slots


def read_rows(plan: ConversionPlan, rows: Rows) -> torch.Tensor:
    """The rows (of 1-D tensors: the elements) stacked, as float32."""
    parts = []
    for name, start, stop in rows:
        with plan.source.rows(name, start, stop) as chunk:
            values = chunk.to(torch.float32)
            parts.append((values[start:stop] if values.dim() == 1 else values).clone())
        if not bool(torch.isfinite(parts[-1]).all()):
            raise ConversionError(f"tensor {name} has NaN or Inf values")
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _param_name(weight: str, layer: int | None, slot: str) -> str:
    """The parameter for a slot: the weight's name, or its `.bias` for a bias slot."""
    name = weight.format(i=layer)
    return name.removesuffix(".weight") + ".bias" if slot.endswith(".bias") else name


def parameter_names(plan: ConversionPlan) -> dict[tuple[int | None, str], str]:
    """The graph parameter each planned (layer, slot) loads into (q, k and v into the fused one)."""
    params = {**COMMON_PARAMS, **_cpu(plan).params, "q": QKV, "k": QKV, "v": QKV}
    names = {}
    for (layer, slot), item in planned_slots(plan).items():
        base = slot.removesuffix(".bias")
        if base not in params:
            raise ConversionError(f"--backend cpu: {plan.family.name}'s CPU graph has no place for {item.source}")
        names[(layer, slot)] = _param_name(params[base], layer, slot)
    return names


def weight_rows(plan: ConversionPlan, config: Any) -> dict[str, Rows]:
    """Every graph parameter and the checkpoint rows it holds (merged with the adapter under
    --merge-lora, through the plan's source); a tied lm_head holds the embedding's."""
    slots, names = planned_slots(plan), parameter_names(plan)
    rows: dict[str, Rows] = {}
    for key, item in slots.items():
        if key[1].removesuffix(".bias") not in ("q", "k", "v"):
            rows[names[key]] = (_whole(item),)
    for layer in range(plan.dims.num_layers):
        attention = config.block_config(layer).attn_config
        for q_slot in ("q", "q.bias"):
            if (layer, q_slot) in slots:
                suffix = q_slot.removeprefix("q")
                q, k, v = (slots[(layer, s + suffix)] for s in "qkv")
                rows[names[(layer, q_slot)]] = _fused_rows(attention, q, k, v)
    if (None, "lm_head") not in slots:
        rows["lm_head.weight"] = rows["tok_embedding.weight"]
    return rows


def load_tensors(plan: ConversionPlan, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Assign `state` to the model's parameters; every parameter must be filled, none left over."""
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ConversionError(f"--backend cpu: {plan.family.name}'s CPU graph has no parameter "
                              f"{', '.join(result.unexpected_keys[:5])}")
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ConversionError(f"--backend cpu: {plan.family.name}'s CPU graph has tensors no checkpoint tensor fills: "
                              f"{', '.join(left[:5])}")
    model.eval()


def load_weights(plan: ConversionPlan, model: torch.nn.Module, config: Any) -> None:
    """Read every planned tensor into the model (a tied lm_head shares the embedding's storage)."""
    read: dict[Rows, torch.Tensor] = {}
    state = {}
    for name, rows in weight_rows(plan, config).items():
        if rows not in read:
            read[rows] = read_rows(plan, rows)
        state[name] = read[rows]
    load_tensors(plan, model, state)


class _LoRAAttention(torch.nn.Module):
    """A block's attention applying the LoRA entry set for the current call (see `with_lora`)."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        self.attention = attention
        self.entry: Any = None

    def forward(self, x: torch.Tensor, rope: Any = None, mask: Any = None, input_pos: Any = None,
                kv_cache: Any = None) -> Any:
        return self.attention(x, rope, mask, input_pos, kv_cache, self.entry)


class _WithLoRA(torch.nn.Module):
    """A litert-torch model whose blocks do not pass LoRA to their attention (Gemma 2, Gemma 3),
    taking `lora` as its own input: each call hands every block's attention its layer's entry."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.blocks: list[Any] = list(model.get_submodule("transformer_blocks").children())
        for block in self.blocks:
            block.atten_func = _LoRAAttention(block.atten_func)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: Any, mask: Any = None,
                lora: Any = None, export_config: Any = None) -> Any:
        for block, entry in zip(self.blocks, lora.adapters if lora is not None else [None] * len(self.blocks)):
            block.atten_func.entry = entry
        try:
            return self.model(tokens, input_pos, kv_cache, mask=mask, export_config=export_config)
        finally:
            for block in self.blocks:
                block.atten_func.entry = None


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The model taking LoRA signature inputs: as it is when its forward has `lora`, else wrapped
    (litert-torch's attention layer applies LoRA; only some model classes pass it on)."""
    if "lora" in inspect.signature(model.forward).parameters:
        return model
    return _WithLoRA(model)
