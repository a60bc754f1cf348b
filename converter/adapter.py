"""LoRA adapter intake: PEFT folders or bare tensor files, keys normalized, rank and scale read.

PEFT stores `lora_A` as `[r, in]` and `lora_B` as `[out, r]` and computes
`W x + scale * B (A x)` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA).
The runtime never reads alpha, so the scale is folded into B when the file is written.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import TensorSource, open_tensor_file
from .errors import ConversionError
from .files import read_json_object
from .models.base import Dims, ModelFamily

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (".default" optional)
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)*layers\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoraPair:
    layer: int
    module: str  # e.g. "self_attn.q_proj"
    a_key: str | None  # None: a target the runtime requires that the adapter lacks (zeros)
    b_key: str | None
    rank: int = 0
    scale: float = 0.0  # PEFT's factor for this module: alpha / r (alpha / sqrt(r) with rsLoRA)


@dataclass(frozen=True)
class LoraAdapter:
    source: TensorSource | None
    path: Path
    rank: int  # the largest module rank; smaller ones are zero-padded to it
    pairs: tuple[LoraPair, ...]


def pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return value
    return default


def _adapter_files(path: Path) -> tuple[Path, dict | None]:
    if path.is_dir():
        config_file = path / ADAPTER_CONFIG
        config = read_json_object(config_file) if config_file.is_file() else None
        for name in ADAPTER_FILES:
            if (path / name).is_file():
                return path / name, config
        raise ConversionError(f"{path}: no {' or '.join(ADAPTER_FILES)} in this adapter folder")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt"):
            raise ConversionError(f"{path}: expected a .safetensors or .bin adapter file")
        sibling = path.parent / ADAPTER_CONFIG
        return path, read_json_object(sibling) if sibling.is_file() else None
    raise ConversionError(f"{path}: LoRA adapter not found")


def load_adapter(path: str | Path, family: ModelFamily, dims: Dims, model_type: str,
                 max_adapter_mb: float | None = None) -> LoraAdapter:
    """Read and check an adapter against the base model's family and dimensions."""
    path = Path(path)
    file, config = _adapter_files(path)
    config = config or {}
    if config.get("use_dora"):
        raise ConversionError(f"{path}: DoRA adapters (use_dora) cannot run as LoRA on the runtime")
    adapter_type = config.get("model_type")  # Workers-AI style configs name the base architecture
    if adapter_type is not None and adapter_type not in family.hf_model_types:
        raise ConversionError(f"{path}: adapter_config.json says model_type {adapter_type!r}, but {model_type} is "
                              f"{' or '.join(repr(t) for t in family.hf_model_types)}")
    if max_adapter_mb is not None and file.stat().st_size > max_adapter_mb * 2**20:
        raise ConversionError(f"{file}: {file.stat().st_size / 2**20:.1f} MB is above --max-adapter-mb {max_adapter_mb}")
    source = open_tensor_file(file)
    halves: dict[tuple[int, str], dict[str, str]] = {}
    unknown = []
    for key in source.names():
        match = LORA_KEY.match(key)
        if not match:
            unknown.append(key)
            continue
        layer, module, half = int(match.group(1)), match.group(2), match.group(3)
        halves.setdefault((layer, module), {})[half] = key
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConversionError(f"{file}: tensors that are not LoRA A/B weights of a layer: {shown}")
    if not halves:
        raise ConversionError(f"{file}: no LoRA tensors found")

    alpha = float(config.get("lora_alpha", config.get("r") or 0)) or None
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    pairs = []
    for (layer, module), pair in sorted(halves.items()):
        where = f"{file}: layer {layer} {module}"
        rule = family.lora_rule(module)
        if rule is None:
            supported = ", ".join(r.hf_module for r in family.lora)
            raise ConversionError(
                f"{where}: LoRA on {module} is not supported for {model_type} (supported targets: {supported})"
            )
        if layer >= dims.num_layers:
            raise ConversionError(f"{where}: layer index beyond the base model's {dims.num_layers} layers")
        for half in "AB":
            if half not in pair:
                raise ConversionError(f"{where}: lora_{half} is missing (found only lora_{'B' if half == 'A' else 'A'})")
        a_shape = source.info(pair["A"]).shape
        b_shape = source.info(pair["B"]).shape
        in_features, out_features = getattr(dims, rule.in_features), getattr(dims, rule.out_features)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_features or b_shape[0] != out_features \
                or a_shape[0] != b_shape[1]:
            raise ConversionError(
                f"{where}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit the base "
                f"(expected [r, {in_features}] and [{out_features}, r])"
            )
        rank = a_shape[0]
        name = f"model.layers.{layer}.{module}"
        config_rank = pattern_value(rank_pattern, name, config.get("r"))
        if config_rank is not None and config_rank != rank:
            raise ConversionError(f"{where}: adapter_config.json says r={config_rank} but the tensors have rank {rank}")
        module_alpha = float(pattern_value(alpha_pattern, name, alpha if alpha is not None else rank))
        scale = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        pairs.append(LoraPair(layer, module, pair["A"], pair["B"], rank, scale))
    rank = max(p.rank for p in pairs)
    present = {(p.layer, p.module) for p in pairs}
    pairs += [LoraPair(layer, module, None, None, rank, 0.0) for layer in range(dims.num_layers)
              for module in family.required_lora if (layer, module) not in present]
    order = {rule.hf_module: i for i, rule in enumerate(family.lora)}
    pairs.sort(key=lambda p: (p.layer, order[p.module]))
    return LoraAdapter(source, path, rank, tuple(pairs))
