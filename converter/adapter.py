"""LoRA adapter intake: PEFT folders or bare tensor files, keys normalized, rank and scale read.

PEFT stores `lora_A` as `[r, in]` and `lora_B` as `[out, r]` and computes
`W x + scale * B (A x)` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA).
The runtime never reads alpha, so the scale is folded into B when the file is written.

Every tensor of an adapter is one of: a LoRA half of a linear module, an embedding LoRA half
(`lora_embedding_A` `[r, vocab]`, `lora_embedding_B` `[hidden, r]`), a DoRA magnitude vector,
or a full replacement of a base tensor (`modules_to_save`, and the `base_layer.weight` copies
PEFT saves next to embedding LoRA). Only linear LoRA on the family's runtime targets can ship
as a LoRA file; everything else can only be merged into the base (converter/merge.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from .adapter_config import ADAPTER_CONFIG, PEFT_DEFAULT_ALPHA, AdapterConfig, read_adapter_config
from .checkpoint import TensorSource, open_tensor_file
from .errors import ConversionError
from .files import read_json_object
from .models.base import Dims, ModelFamily, Role, dims_from_config

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_FLAGS = "--merge-lora --merge-unsupported"
MergeMode = Literal["lora", "all"]  # --merge-lora alone / with --merge-unsupported
# Tensor kinds by key suffix, tried in order on the key without `base_model.model.` and `.default`.
KEY_KINDS = (
    ("A", re.compile(r"^(.+)\.lora_A\.weight$")),
    ("B", re.compile(r"^(.+)\.lora_B\.weight$")),
    ("B_bias", re.compile(r"^(.+)\.lora_B\.bias$")),
    ("embedding_A", re.compile(r"^(.+)\.lora_embedding_A$")),
    ("embedding_B", re.compile(r"^(.+)\.lora_embedding_B$")),
    ("magnitude", re.compile(r"^(.+)\.lora_magnitude_vector(?:\.weight)?$")),
    ("base_layer", re.compile(r"^(.+)\.base_layer\.weight$")),
    ("full", re.compile(r"^(.+)\.weight$")),
    ("base_layer_bias", re.compile(r"^(.+)\.base_layer\.bias$")),  # bias="lora_only" / "all"
    ("full_bias", re.compile(r"^(.+)\.bias$")),  # modules_to_save of a module with a bias (Phi-2's lm_head)
)
BIAS_KINDS = ("base_layer_bias", "full_bias")
LAYER_MODULE = re.compile(r"^layers\.(\d+)\.(.+)$")
COMPARE_ROWS = 4096


@dataclass(frozen=True)
class LoraPair:
    layer: int
    module: str  # e.g. "self_attn.q_proj"
    a_key: str | None  # None: a target the runtime requires that the adapter lacks (zeros)
    b_key: str | None
    rank: int = 0
    scale: float = 0.0  # PEFT's factor for this module: alpha / r (alpha / sqrt(r) with rsLoRA)


@dataclass(frozen=True)
class TensorMerge:
    """How one base tensor changes when the adapter is merged into it (PEFT's merge, per tensor):
    replaced by `replacement`, then `+ scale * B @ A` (embedding LoRA: `(B @ A).T`), then, for
    DoRA, each output row rescaled to its magnitude."""

    target: str  # canonical base tensor name, e.g. "layers.0.self_attn.q_proj.weight"
    what: str  # "LoRA", "DoRA", "embedding LoRA", "replaced", ... (messages, --dry-run)
    runtime_lora: bool  # could ship as a LoRA file; everything else needs --merge-unsupported
    a_key: str | None = None
    b_key: str | None = None
    rank: int = 0
    scale: float = 0.0
    embedding: bool = False
    magnitude: str | None = None
    replacement: str | None = None


@dataclass(frozen=True)
class LoraAdapter:
    source: TensorSource | None
    path: Path
    rank: int  # the largest module rank; smaller ones are zero-padded to it
    pairs: tuple[LoraPair, ...]  # the LoRA file's modules (empty when merging)
    merges: tuple[TensorMerge, ...] = ()  # the base tensors merging changes (empty unless merging)
    notes: tuple[str, ...] = ()  # warnings for the user (the base model's name differs)


def _plain(key: str) -> str:
    """A key without PEFT's `base_model.model.` prefix, `.default` adapter name and the
    `.modules_to_save` wrapper older PEFT versions left in modules_to_save keys."""
    key = key.removeprefix("base_model.model.").replace(".default.", ".").removesuffix(".default")
    return key.replace(".modules_to_save.", ".")


def canonical(name: str, family: ModelFamily | None = None) -> str:
    """A tensor or module name without PEFT's wrappers, the family's name prefixes (a multimodal
    model's `language_model.`) and leading `model.`s (base and adapter alike)."""
    name = _plain(name)
    if family is not None:
        name = family.text_name(name)
    while name.startswith("model."):
        name = name[len("model."):]
    return name


def base_tensors(family: ModelFamily, dims: Dims) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor the family's base checkpoint holds."""
    tensors = {canonical(rule.hf): dims.shape(rule.shape) for rule in family.head + family.tail}
    for layer in range(dims.num_layers):
        prefix = family.layer_prefix.format(i=layer)
        tensors.update({canonical(prefix + rule.hf): dims.shape(rule.shape) for rule in family.layer})
    return tensors


def tied_output(family: ModelFamily) -> bool:
    """Whether the embedding doubles as the output projection (no lm_head tensor of its own)."""
    return "lm_head.weight" not in {canonical(rule.hf) for rule in family.head + family.tail}


def _adapter_files(path: Path) -> tuple[Path, AdapterConfig]:
    if path.is_dir():
        config = read_adapter_config(path / ADAPTER_CONFIG)
        for name in ADAPTER_FILES:
            if (path / name).is_file():
                return path / name, config
        raise ConversionError(f"{path}: no {' or '.join(ADAPTER_FILES)} in this adapter folder")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt"):
            raise ConversionError(f"{path}: expected a .safetensors or .bin adapter file")
        return path, read_adapter_config(path.parent / ADAPTER_CONFIG)
    raise ConversionError(f"{path}: LoRA adapter not found")


def _group_keys(source: TensorSource, file: Path, family: ModelFamily) -> dict[str, dict[str, str]]:
    """Module path (canonical) -> {kind: key}; unknown keys are refused, listed. Keys of modules
    outside the family's text model (a vision tower) are left out, as the base's are."""
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for key in source.names():
        if any(part in key for part in family.skipped):
            continue
        for kind, pattern in KEY_KINDS:
            match = pattern.match(_plain(key))
            if match:
                keys = modules.setdefault(canonical(match.group(1), family), {})
                if kind in keys:
                    raise ConversionError(f"{file}: {keys[kind]} and {key} are the same tensor under two names "
                                          f"(PEFT would load only one of them); keep one")
                keys[kind] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{file}: tensors that are not LoRA weights or base-model tensors: {_shown(unknown)}")
    if not modules:
        raise ConversionError(f"{file}: no LoRA tensors found")
    return modules


def where(module: str) -> str:
    """A module for messages: "layer 3 self_attn.q_proj", or its name outside the layers."""
    match = LAYER_MODULE.match(module)
    return f"layer {match.group(1)} {match.group(2)}" if match else module


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class _Reader:
    """Reads one adapter against one base: shapes, ranks and scales, one module at a time."""

    def __init__(self, source: TensorSource, file: Path, config: AdapterConfig, family: ModelFamily, dims: Dims,
                 model_type: str):
        self.source, self.file, self.config = source, file, config
        self.family, self.dims, self.model_type = family, dims, model_type
        self.base = base_tensors(family, dims)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.source.info(key).shape)

    def fail(self, message: str) -> ConversionError:
        return ConversionError(f"{self.file}: {message}")

    def rank_and_scale(self, module: str, peft_name: str, a_key: str) -> tuple[int, float]:
        rank = self.shape(a_key)[0]
        config_rank = self.config.rank(peft_name)
        if config_rank is not None and config_rank != rank:
            raise self.fail(f"{where(module)}: {ADAPTER_CONFIG} says r={config_rank} but the tensors have "
                            f"rank {rank}")
        return rank, self.config.scale(peft_name, rank)

    def check_halves(self, module: str, keys: dict[str, str], a: str, b: str) -> None:
        for half, other in ((a, b), (b, a)):
            if half not in keys:
                raise self.fail(f"{where(module)}: lora_{half.removeprefix('embedding_')} is missing "
                                f"(found only {keys[other]})")
        if self.shape(keys[a])[:1] == (0,):
            raise self.fail(f"{where(module)}: {keys[a]} has rank 0 (shape {list(self.shape(keys[a]))})")

    def linear(self, module: str, keys: dict[str, str], target_shape: tuple[int, ...]) -> None:
        """Check a linear LoRA's halves (and DoRA magnitude) against its base weight `[out, in]`."""
        self.check_halves(module, keys, "A", "B")
        out_features, in_features = target_shape
        a_shape, b_shape = self.shape(keys["A"]), self.shape(keys["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_features or b_shape[0] != out_features \
                or a_shape[0] != b_shape[1]:
            raise self.fail(f"{where(module)}: {keys['A']} {list(a_shape)} / {keys['B']} {list(b_shape)} do "
                            f"not fit the base (expected [r, {in_features}] and [{out_features}, r])")
        if "magnitude" in keys and self.shape(keys["magnitude"]) != (out_features,):
            raise self.fail(f"{keys['magnitude']} has shape {list(self.shape(keys['magnitude']))}, "
                            f"expected [{out_features}]")

    def embedding(self, module: str, keys: dict[str, str], target_shape: tuple[int, ...]) -> None:
        self.check_halves(module, keys, "embedding_A", "embedding_B")
        rows, cols = target_shape
        a_shape, b_shape = self.shape(keys["embedding_A"]), self.shape(keys["embedding_B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != rows or b_shape[0] != cols \
                or a_shape[0] != b_shape[1]:
            raise self.fail(f"{module}: {keys['embedding_A']} {list(a_shape)} / {keys['embedding_B']} "
                            f"{list(b_shape)} do not fit the base (expected [r, {rows}] and [{cols}, r])")

    def replacement(self, key: str, target: str) -> None:
        want = self.base[target]
        if self.shape(key) != want:
            raise self.fail(f"{key} has shape {list(self.shape(key))}, expected {list(want)} like the base's {target}")


def _equal(source: TensorSource, first: str, second: str, transpose: bool = False) -> bool:
    """Whether two adapter tensors hold the same values (the second transposed), read in row chunks."""
    shape = source.info(first).shape
    if transpose:
        with source.rows(first, 0, shape[0]) as a, source.rows(second, 0, source.info(second).shape[0]) as b:
            return a.shape == b.t().shape and bool(torch.equal(a.float(), b.float().t()))
    if source.info(second).shape != shape:
        return False
    for start in range(0, shape[0], COMPARE_ROWS):
        stop = min(start + COMPARE_ROWS, shape[0])
        with source.rows(first, start, stop) as a, source.rows(second, start, stop) as b:
            if not torch.equal(a.float(), b.float()):
                return False
    return True


def _embedding_target(family: ModelFamily) -> str:
    return next(canonical(rule.hf) for rule in family.head if rule.role is Role.EMBEDDING)


def _merges(reader: _Reader, modules: dict[str, dict[str, str]], dora: bool) -> list[TensorMerge]:
    """What merging changes in the base, module by module; refuses what cannot be merged exactly."""
    if tied_output(reader.family) and "lm_head" in modules:
        embedding = _embedding_target(reader.family).removesuffix(".weight")
        _check_tied_copy(reader, modules.pop("lm_head"), modules.get(embedding))
    merges = []
    for module, keys in sorted(modules.items()):
        if "B_bias" in keys:
            raise reader.fail(f"{keys['B_bias']}: lora_B has a bias (lora_bias), which the runtime's LoRA and this "
                              f"converter's merge do not take")
        weight = {kind: key for kind, key in keys.items() if kind not in BIAS_KINDS}
        bias = {kind: key for kind, key in keys.items() if kind in BIAS_KINDS}
        merges += [_module_merge(reader, module, weight, dora)] if weight else []
        merges += [_bias_merge(reader, module, bias)] if bias else []
    return merges


def _bias_merge(reader: _Reader, module: str, keys: dict[str, str]) -> TensorMerge:
    """A trained bias (modules_to_save, or PEFT's bias="all" / "lora_only") replacing `<module>.bias`."""
    target = module + ".bias"
    if len(keys) > 1:
        raise reader.fail(f"{keys['base_layer_bias']} and {keys['full_bias']} both replace {target}")
    key = next(iter(keys.values()))
    if target not in reader.base:
        raise reader.fail(f"{key}: {reader.model_type} has no {target} for it to replace")
    reader.replacement(key, target)
    return TensorMerge(target, "modules_to_save replacement", False, replacement=key)


def _module_merge(reader: _Reader, module: str, keys: dict[str, str], dora: bool) -> TensorMerge:
    """One module's change to its base tensor `<module>.weight`, checked against the base."""
    family, base, target = reader.family, reader.base, module + ".weight"
    layer = LAYER_MODULE.match(module)
    if layer and int(layer.group(1)) >= reader.dims.num_layers:
        raise reader.fail(f"{where(module)}: layer index beyond the base model's {reader.dims.num_layers} layers")
    linear, embedding = "A" in keys or "B" in keys, "embedding_A" in keys or "embedding_B" in keys
    if target not in base and not (linear or embedding):
        raise reader.fail(f"tensors that are not LoRA weights or base-model tensors: {_shown(list(keys.values()))}")
    if target not in base or ((linear or embedding) and len(base[target]) != 2):
        supported = ", ".join(r.hf_module for r in family.lora) or "none"
        raise reader.fail(f"{where(module)}: LoRA on {module} is not supported for {reader.model_type} "
                          f"(supported targets: {supported})")
    if tied_output(family) and target == _embedding_target(family) and not reader.config.ensure_weight_tying:
        raise reader.fail(
            f"{module}: {reader.model_type} uses one tensor for the embedding and the output layer, but PEFT "
            f"applies this adapter's {module} change to the input lookup only (ensure_weight_tying is not set), "
            f"so it cannot be merged exactly; train with ensure_weight_tying=True"
        )
    if "base_layer" in keys and "full" in keys:
        raise reader.fail(f"{keys['base_layer']} and {keys['full']} both replace {target}")
    replacement = keys.get("base_layer", keys.get("full"))
    if replacement is not None:
        reader.replacement(replacement, target)
    shape = base[target]
    if "magnitude" in keys and embedding:
        raise reader.fail(f"{module}: DoRA on the embedding is not supported")
    if "magnitude" in keys and not linear:
        raise reader.fail(f"{keys['magnitude']}: DoRA magnitude without LoRA halves")
    if linear:
        if dora and "magnitude" not in keys:
            raise reader.fail(f"{where(module)}: use_dora is set but lora_magnitude_vector is missing")
        reader.linear(module, keys, shape)
        rank, scale = reader.rank_and_scale(module, _peft_name(keys["A"]), keys["A"])
        what = "DoRA" if "magnitude" in keys else "LoRA"
        runtime = layer is not None and family.lora_rule(layer.group(2)) is not None
        return TensorMerge(target, what, runtime and what == "LoRA" and replacement is None, keys["A"], keys["B"],
                           rank, scale, magnitude=keys.get("magnitude"), replacement=replacement)
    if embedding:
        reader.embedding(module, keys, shape)
        rank, scale = reader.rank_and_scale(module, _peft_name(keys["embedding_A"]), keys["embedding_A"])
        return TensorMerge(target, "embedding LoRA", False, keys["embedding_A"], keys["embedding_B"], rank, scale,
                           embedding=True, replacement=replacement)
    return TensorMerge(target, "modules_to_save replacement", False, replacement=replacement)


def _peft_name(key: str) -> str:
    """The module name PEFT matches rank_pattern / alpha_pattern against."""
    return _plain(key).rsplit(".lora_", 1)[0]


def _check_tied_copy(reader: _Reader, head: dict[str, str], embed: dict[str, str] | None) -> None:
    """lm_head parts on a tied model are exact only as PEFT's tied copies of the embedding's."""
    model_type = reader.model_type
    if not reader.config.ensure_weight_tying or embed is None:
        raise reader.fail(f"{_shown(sorted(head.values()))}: {model_type} uses one tensor for the embedding and "
                          f"the output layer, so an adapter that changes lm_head alone cannot be applied or merged "
                          f"exactly")
    copies = [("A", "embedding_B", True), ("B", "embedding_A", True), ("base_layer", "base_layer", False),
              ("full", "full", False)]
    for kind, embed_kind, transpose in copies:
        if kind in head and (embed_kind not in embed or not _equal(reader.source, head[kind], embed[embed_kind],
                                                                   transpose)):
            raise reader.fail(f"{head[kind]} is not the tied copy of the embedding's adapter tensors "
                              f"({model_type} uses one tensor for both), so it cannot be merged exactly")
    unknown = set(head) - {kind for kind, _, _ in copies}
    if unknown:
        raise reader.fail(f"{', '.join(head[k] for k in sorted(unknown))}: cannot be merged on {model_type}, "
                          f"whose output layer is the embedding")


def _chunks(source: TensorSource, key: str) -> Iterator[torch.Tensor]:
    """A tensor's values as float32, COMPARE_ROWS rows at a time (a vector in one piece)."""
    shape = source.info(key).shape
    rows = shape[0] if len(shape) > 1 else 1
    for start in range(0, rows, COMPARE_ROWS):
        with source.rows(key, start, min(start + COMPARE_ROWS, rows)) as chunk:
            yield chunk.to(torch.float32)


def _largest(source: TensorSource, key: str) -> float:
    """The largest absolute value of an adapter tensor, refused by name when any is NaN or Inf."""
    largest = 0.0
    for chunk in _chunks(source, key):
        if not bool(torch.isfinite(chunk).all()):
            raise ConversionError(f"adapter tensor {key} has NaN or Inf values")
        largest = max(largest, float(chunk.abs().max()) if chunk.numel() else 0.0)
    return largest


def _value_notes(reader: _Reader, merges: list[TensorMerge], merging: bool) -> tuple[str, ...]:
    """Read every tensor the conversion will use, before anything is written: NaN/Inf anywhere, or a
    scale that makes a stored value overflow, is refused; LoRA that changes nothing is a warning."""
    stored = "fp32" if merging else reader.family.lora_float  # LoRA halves are stored in the family's width
    limit = float(torch.finfo(torch.float16 if stored == "fp16" else torch.float32).max)
    untrained = []
    for merge in merges:
        for key in (merge.magnitude, merge.replacement):
            if key is not None:
                _largest(reader.source, key)
        if merge.a_key is None:
            continue
        largest_a, largest_b = _largest(reader.source, merge.a_key), _largest(reader.source, merge.b_key)
        scaled = largest_b * abs(merge.scale)  # merging adds up to rank * |A| * |scale B| to a base value
        checks = ((merge.b_key, scaled * largest_a * merge.rank),) if merging else \
            ((merge.a_key, largest_a), (merge.b_key, scaled))
        for key, value in checks:
            if value > limit:
                raise reader.fail(f"{key}: with the scale {merge.scale:.3g} (lora_alpha / r) values reach "
                                  f"{value:.3g}, more than {stored} holds ({limit:.5g}); check lora_alpha in "
                                  f"{ADAPTER_CONFIG}")
        if largest_a * largest_b == 0:
            untrained.append(where(merge.target.removesuffix(".weight")))
    notes = []
    if reader.config.alpha_defaulted:
        notes.append(f"{reader.config.file} has no lora_alpha: using PEFT's default {PEFT_DEFAULT_ALPHA:g} "
                     f"(scale {PEFT_DEFAULT_ALPHA:g} / r), as PEFT loads it")
    if reader.config.zero_alphas:
        notes.append(f"{reader.config.file}: {', '.join(reader.config.zero_alphas)} is 0, so PEFT's scale is 0 and "
                     f"the modules it applies to change nothing")
    lora = [m for m in merges if m.a_key is not None]
    if untrained and len(untrained) == len(lora) and len(lora) == len(merges):
        notes.append(f"{reader.file}: every LoRA module has an all-zero lora_A or lora_B, so this adapter "
                     f"changes nothing; was it trained?")
    elif untrained:
        notes.append(f"{reader.file}: {len(untrained)} LoRA modules have an all-zero lora_A or lora_B and "
                     f"change nothing: {_shown(untrained)}")
    return tuple(notes)


def _target_notes(config: AdapterConfig, family: ModelFamily, dims: Dims, model_type: str) -> tuple[str, ...]:
    """A warning for `target_modules` names that match no module of the base (PEFT trained nothing there)."""
    if not isinstance(config.target_modules, tuple):
        return ()  # a regex, or none given
    modules = {name.rsplit(".", 1)[0] for name in base_tensors(family, dims)} | {"lm_head"}
    missing = [target for target in config.target_modules
               if not any(module == canonical(target) or module.endswith("." + canonical(target))
                          for module in modules)]
    if not missing:
        return ()
    return (f"{config.file}: target_modules names {', '.join(missing)}, which {model_type} does not have "
            f"(nothing was trained there)",)


def _runtime_pairs(reader: _Reader, merges: list[TensorMerge]) -> list[LoraPair]:
    """The LoRA file's modules; parts only merging can apply are refused, naming the flags."""
    pairs = []
    for merge in merges:
        module = merge.target.removesuffix(".weight")
        if not merge.runtime_lora:
            raise reader.fail(f"{where(module)}: the {reader.model_type} runtime cannot apply this "
                              f"{merge.what}; merge it into the base weights with {MERGE_FLAGS}")
        layer = LAYER_MODULE.match(module)
        pairs.append(LoraPair(int(layer.group(1)), layer.group(2), merge.a_key, merge.b_key, merge.rank, merge.scale))
    return pairs


def base_model_notes(config: AdapterConfig, family: ModelFamily, dims: Dims,
                     base_config: dict | None) -> tuple[str, ...]:
    """Compare `base_model_name_or_path` with the base: a local folder whose config.json disagrees is
    refused; a differing name is only a note (hub ids and local paths legitimately differ)."""
    name, config_file = config.base_model, config.file
    if name is None:
        return ()
    their_config = _local_config(name)
    if their_config is not None:
        theirs = read_json_object(their_config)
        their_type = theirs.get("model_type")
        if their_type is not None and their_type not in family.hf_model_types:
            raise ConversionError(f"{config_file}: base_model_name_or_path {name} is a {their_type!r} model, "
                                  f"the base checkpoint is {' or '.join(family.hf_model_types)}")
        their_dims = dims_from_config(family, theirs, str(their_config))
        if their_dims != dims:
            raise ConversionError(f"{config_file}: the adapter was trained on {name} ({their_dims.describe()}), "
                                  f"the base checkpoint has {dims.describe()}")
        return ()
    ours = (base_config or {}).get("_name_or_path")
    if isinstance(ours, str) and ours and _short(ours) != _short(name):
        return (f"{config_file} names base model {name!r}, the checkpoint's config.json says {ours!r}; "
                f"the shapes fit, converting anyway",)
    return ()


def _local_config(name: str) -> Path | None:
    """`<name>/config.json` when `name` is a folder here that has one; None for hub ids and for names
    no path can have (`~nosuchuser`, NUL bytes, too long)."""
    try:
        their_config = Path(name).expanduser() / "config.json"
        return their_config if their_config.is_file() else None
    except (OSError, RuntimeError, ValueError):
        return None


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def load_adapter(path: str | Path, family: ModelFamily, dims: Dims, model_type: str,
                 max_adapter_mb: float | None = None, merge: MergeMode | None = None,
                 base_config: dict | None = None) -> LoraAdapter:
    """Read and check an adapter against the base model's family and dimensions.

    Without `merge`, the result's `pairs` are the LoRA file's modules; with it, `merges` says what
    changes in the base (`"lora"`: only what could ship as LoRA, `"all"`: everything exact).
    """
    path = Path(path)
    if max_adapter_mb is not None and not (math.isfinite(max_adapter_mb) and max_adapter_mb > 0):
        raise ConversionError(f"--max-adapter-mb {max_adapter_mb}: expected a positive number of megabytes")
    file, config = _adapter_files(path)
    if config.use_dora and merge != "all":
        raise ConversionError(f"{path}: DoRA adapters (use_dora) cannot run as LoRA on the runtime; merge it into "
                              f"the base weights with {MERGE_FLAGS}")
    if config.model_type is not None and config.model_type not in family.hf_model_types:
        raise ConversionError(f"{path}: {ADAPTER_CONFIG} says model_type {config.model_type!r}, but {model_type} "
                              f"is {' or '.join(repr(t) for t in family.hf_model_types)}")
    notes = base_model_notes(config, family, dims, base_config) + _target_notes(config, family, dims, model_type)
    if max_adapter_mb is not None and file.stat().st_size > max_adapter_mb * 2**20:
        raise ConversionError(f"{file}: {file.stat().st_size / 2**20:.1f} MB is above --max-adapter-mb {max_adapter_mb}")
    source = open_tensor_file(file)
    try:
        reader = _Reader(source, file, config, family, dims, model_type)
        outside = [key for key in source.names() if any(part in key for part in family.skipped)]
        if outside:
            notes = (*notes, f"{file}: {len(outside)} tensors outside the text model are not converted "
                             f"(the runtime has no such part): {_shown(outside)}")
        merges = _merges(reader, _group_keys(source, file, family), config.use_dora)
        rank = max((m.rank for m in merges), default=0)
        if merge is not None:
            refused = [m for m in merges if not m.runtime_lora] if merge == "lora" else []
            if refused:
                module = refused[0].target.removesuffix(".weight")
                raise reader.fail(f"{where(module)}: the {model_type} runtime cannot apply this "
                                  f"{refused[0].what}, so --merge-lora alone does not merge it; use {MERGE_FLAGS}")
            notes += _value_notes(reader, merges, merging=True)
            return LoraAdapter(source, path, rank, (), tuple(merges), notes)
        pairs = _runtime_pairs(reader, merges)
        notes += _value_notes(reader, merges, merging=False)
        present = {(p.layer, p.module) for p in pairs}
        pairs += [LoraPair(layer, module, None, None, rank, 0.0) for layer in range(dims.num_layers)
                  for module in family.required_lora if (layer, module) not in present]
        order = {rule.hf_module: i for i, rule in enumerate(family.lora)}
        pairs.sort(key=lambda p: (p.layer, order[p.module]))
        return LoraAdapter(source, path, rank, tuple(pairs), (), notes)
    except BaseException:
        source.close()
        raise
