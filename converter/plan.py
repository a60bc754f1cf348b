"""The tensor plan: which input tensor becomes which output tensors, checked before writing.

Planning reads only headers (and the small adapter, and a Gemma `lm_head` to compare with the
embedding), so every shape, name and option problem is reported before a single output byte is
written; `--dry-run` prints the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import tflite
from .adapter import LoraAdapter, load_adapter
from .checkpoint import TensorSource, open_checkpoint
from .cpu import rules as cpu_lora
from .config import ConversionConfig
from .errors import ConversionError
from .files import read_json_object
from .merge import MergedSource
from .models import find_model_type, lora_model_type_names
from .models.values import flag, shown, strings
from .models.base import Dims, ModelFamily, ModelType, WeightRule, check_parameters, dims_from_config
from .special_tokens import apply_special_tokens
from .split import SplittingSource
from .tokenizer import check_tokenizer_size, load_tokenizer

QUANT_BITS = {"int8": 8, "int4": 4}
FLOAT_TYPES = {"fp16": tflite.FLOAT16, "fp32": tflite.FLOAT32}
LORA_FLOAT_BYTES = {"fp16": 2, "fp32": 4}  # LoRA halves are typed FLOAT32 whatever their width
LORA_RANK_STEP = 4  # LoRA halves are tiled 4x4, so the rank is a multiple of 4


@dataclass(frozen=True)
class PlannedTensor:
    """One input tensor (or a block of zeros) and the output tensors it becomes, in file order."""

    source: str | None
    shape: tuple[int, ...]
    dtype: str
    encoding: str  # int8 | int4 | fp16 | fp32 (tiled weights) | float32 (raw) | lora-A | lora-B
    outputs: tuple[tflite.TensorSpec, ...]
    lora_rule_transposed: bool = False  # o_proj halves in --mediapipe-compat
    scale: float = 1.0  # factor folded into the stored values (LoRA B: PEFT's alpha / r)
    lora_transposed_back: bool = False  # ... and then transposed (Phi-2's post in --mediapipe-compat)

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.outputs)


@dataclass
class ConversionPlan:
    config: ConversionConfig
    family: ModelFamily
    model_type: ModelType
    dims: Dims
    parameters: bytes
    tokenizer: bytes
    source: TensorSource
    base: list[PlannedTensor]
    adapter: LoraAdapter | None = None
    lora: list[PlannedTensor] | None = None
    notes: list[str] = field(default_factory=list)  # `note:`/`warning:` lines for the user (special tokens)
    hf_config: dict = field(default_factory=dict)  # the checkpoint's config.json ({} without one)

    def metadata(self, lora_rank: int | None = None) -> list[tuple[str, tflite.MetadataValue]]:
        items: list[tuple[str, tflite.MetadataValue]] = [
            (tflite.LLM_PARAMETERS, self.parameters),
            (tflite.SPM_VOCAB_MODEL, self.tokenizer),
            (tflite.LLM_MODEL_TYPE, self.model_type.enum_value),
            (tflite.BACKEND, self.config.backend.encode()),
        ]
        if lora_rank is not None:
            items.append((tflite.LORA_RANK, lora_rank))
        return items

    def close(self) -> None:
        self.source.close()
        if self.adapter is not None and self.adapter.source is not None:
            self.adapter.source.close()


def quantized_outputs(name: str, rows: int, cols: int, bits: int, lookup_order: bool) -> tuple[tflite.TensorSpec, ...]:
    """`<n>_quantized_scale, <n>, <n>.sum_i` (lookup embedding: `<n>, <n>.sum_i, <n>_quantized_scale`)."""
    data_type = tflite.INT8 if bits == 8 else tflite.INT4
    weights = tflite.TensorSpec(name, data_type, rows * cols * bits // 8)
    sums = tflite.TensorSpec(f"{name}.sum_i", tflite.INT32, rows * 4)
    scale = tflite.TensorSpec(f"{name}_quantized_scale", tflite.FLOAT32, rows * 4)
    return (weights, sums, scale) if lookup_order else (scale, weights, sums)


def checkpoint_folder(checkpoint: Path) -> Path:
    """The folder of the checkpoint's config.json, generation_config.json and tokenizer_config.json."""
    return checkpoint if checkpoint.is_dir() else checkpoint.parent


def _read_config(checkpoint: Path) -> tuple[dict | None, Path]:
    """config.json beside the checkpoint (None when there is none: a FIFO or folder in its place is
    refused, not taken as missing), with the keys every family relies on type-checked."""
    path = checkpoint_folder(checkpoint) / "config.json"
    if not path.exists() and not path.is_symlink():
        return None, path
    config = read_json_object(path)
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise ConversionError(f"{path}: model_type must be a string, got {shown(config['model_type'])}")
    strings(config, "architectures", source=str(path))
    flag(config, "tie_word_embeddings", True, source=str(path))
    return config, path


def resolve_dims(family: ModelFamily, model_type: ModelType, checkpoint: Path) -> tuple[Dims, dict]:
    """Dims from config.json, checked against the model type; the type's real sizes without it."""
    config, path = _read_config(checkpoint)
    if config is None:
        return model_type.reference, {}
    hf_type = config.get("model_type")
    if hf_type is not None and hf_type not in family.hf_model_types:
        raise ConversionError(
            f"{path}: model_type {hf_type!r} does not match --model-type {model_type.name} "
            f"(expects {' or '.join(repr(t) for t in family.hf_model_types)})"
        )
    dims = dims_from_config(family, config, str(path))
    for other in family.model_types:
        if other is not model_type and dims == other.reference:
            raise ConversionError(
                f"{path}: the checkpoint has {other.name}'s shapes ({dims.describe()}), not {model_type.name}'s; "
                f"use --model-type {other.name}"
            )
    return dims, config


def _expand(rule: WeightRule, layer: int | None, family: ModelFamily) -> tuple[str, str]:
    if layer is None:
        return rule.hf, rule.mp
    return family.layer_prefix.format(i=layer) + rule.hf, family.mp_layer_prefix.format(i=layer) + rule.mp


def _check_tileable(name: str, shape: tuple[int, ...]) -> None:
    if any(d % 4 for d in shape):
        raise ConversionError(
            f"tensor {name} has shape {list(shape)}: the GPU layout tiles 4x4, so both dimensions must be multiples of 4"
        )


def plan_base(family: ModelFamily, dims: Dims, source: TensorSource, quantization: str) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its outputs; refuse missing, misshaped or unknown tensors."""
    expected: list[tuple[WeightRule, str, str]] = []
    expected += [(rule, *_expand(rule, None, family)) for rule in family.head]
    for layer in range(dims.num_layers):
        expected += [(rule, *_expand(rule, layer, family)) for rule in family.layer]
    expected += [(rule, *_expand(rule, None, family)) for rule in family.tail]
    available = {_strip_prefix(name, family): name for name in source.names()
                 if not any(part in name for part in family.skipped)}
    unused = set(available)

    plan = []
    missing = []
    for rule, hf_name, mp_name in expected:
        key = hf_name if hf_name in available or rule.tied is None else rule.tied
        name = available.get(key)
        if name is None:
            missing.append(hf_name)
            continue
        unused.discard(key)
        info = source.info(name)
        want = dims.shape(rule.shape)
        if info.shape != want:
            raise ConversionError(f"tensor {name} has shape {list(info.shape)}, expected {list(want)} ({dims.describe()})")
        if rule.split is not None:
            name = _add_slice(source, name, rule, dims)
            info = source.info(name)
        plan.append(_plan_weight(rule, name, mp_name, info.shape, str(info.dtype).removeprefix("torch."), quantization))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConversionError(f"checkpoint is missing tensor(s) {shown} for a {dims.num_layers}-layer {family.name} model")
    copies = {name for name, _ in family.tied_copies}
    unknown = [available[key] for key in available if key in unused and key not in copies]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ConversionError(f"checkpoint has tensor(s) that a {family.name} model does not: {shown}")
    return plan


def _add_slice(source: TensorSource, name: str, rule: WeightRule, dims: Dims) -> str:
    if not isinstance(source, SplittingSource):
        raise TypeError("fused tensors need a SplittingSource")
    return source.add_slice(name, rule.split.part, rule.split.parts, getattr(dims, rule.split.block))


def _strip_prefix(name: str, family: ModelFamily) -> str:
    """The checkpoint name as the family's rules spell it: without PEFT's and the family's prefixes
    (e.g. Gemma 3's `language_model.` in `language_model.model.layers.0...` and `model.language_model.layers.0...`)."""
    return family.text_name(name.removeprefix("base_model.model."))


def _plan_weight(rule: WeightRule, name: str, mp_name: str, shape: tuple[int, ...], dtype: str,
                 quantization: str) -> PlannedTensor:
    if not rule.role.quantized:
        return PlannedTensor(name, shape, dtype, "float32", (tflite.TensorSpec(mp_name, tflite.FLOAT32, shape[0] * 4),))
    _check_tileable(name, shape)
    rows, cols = shape
    if quantization in QUANT_BITS:
        bits = QUANT_BITS[quantization]
        return PlannedTensor(name, shape, dtype, quantization,
                             quantized_outputs(mp_name, rows, cols, bits, rule.lookup_order))
    data_type = FLOAT_TYPES[quantization]
    itemsize = 2 if data_type == tflite.FLOAT16 else 4
    return PlannedTensor(name, shape, dtype, quantization, (tflite.TensorSpec(mp_name, data_type, rows * cols * itemsize),))


def plan_lora(family: ModelFamily, dims: Dims, adapter: LoraAdapter, rank: int, compat: bool,
              peft_scaling: bool) -> list[PlannedTensor]:
    """LoRA halves as tile4 tensors in the family's float width, `a_name`'s first, in the family's
    target order; B carries PEFT's scale when `peft_scaling`."""
    plan = []
    for pair in adapter.pairs:
        rule = family.lora_rule(pair.module)
        prefix = family.mp_layer_prefix.format(i=pair.layer) + rule.mp
        in_features, out_features = getattr(dims, rule.in_features), getattr(dims, rule.out_features)
        swapped = compat and rule.swapped_in_mediapipe
        transposed = compat and rule.transposed_in_mediapipe or swapped
        a_name, b_name = (rule.b_name, rule.a_name) if swapped else (rule.a_name, rule.b_name)
        halves = (("A", pair.a_key, a_name, (rank, in_features)), ("B", pair.b_key, b_name, (out_features, rank)))
        itemsize = LORA_FLOAT_BYTES[family.lora_float]
        for half, key, name, shape in reversed(halves) if swapped else halves:  # the file lists a_name's first
            dtype = str(adapter.source.info(key).dtype).removeprefix("torch.") if key else "zeros"
            _check_tileable(key or f"{prefix}.{name}", shape)
            spec = tflite.TensorSpec(f"{prefix}.{name}", tflite.FLOAT32, shape[0] * shape[1] * itemsize)
            scale = pair.scale if half == "B" and peft_scaling else 1.0
            plan.append(PlannedTensor(key, shape, dtype, f"lora-{half}", (spec,), transposed, scale,
                                      lora_transposed_back=swapped))
    return plan


def read_tokenizer(path: Path, family: ModelFamily, dims: Dims) -> bytes:
    """The SentencePiece model bytes, checked to load and to fit the model's vocabulary."""
    data, processor = load_tokenizer(path, "--vocab-model-file")
    check_tokenizer_size(data, processor.vocab_size(), dims.vocab_size, family.untokenized_rows,
                         f"--vocab-model-file {path}", "the model")
    return data


def check_tied_copies(family: ModelFamily, source: TensorSource, block_rows: int = 4096) -> None:
    """Refuse a checkpoint whose copy of a tied tensor (Gemma's lm_head) differs from the tensor it
    must copy: the file has one tensor for both, so writing it would silently drop the other."""
    available = {_strip_prefix(name, family): name for name in source.names()}
    for copy_key, of_key in family.tied_copies:
        copy, of = available.get(copy_key), available.get(of_key)
        if copy is None or of is None:
            continue
        info, of_info = source.info(copy), source.info(of)
        same = info.shape == of_info.shape and info.dtype == of_info.dtype
        for start in range(0, info.shape[0] if same else 0, block_rows):
            stop = min(start + block_rows, info.shape[0])
            with source.rows(copy, start, stop) as a, source.rows(of, start, stop) as b:
                same = torch.equal(a, b)
            if not same:
                break
        if not same:
            raise ConversionError(f"checkpoint tensor {copy} differs from {of}: {family.name}'s weights file has one "
                                  f"tensor for both (tied embeddings), so an untied {copy_key} cannot be written")


def runtime_rank(rank: int) -> int:
    """The smallest rank the GPU runtime takes that holds `rank` (a multiple of 4: halves tile 4x4)."""
    return -(-rank // LORA_RANK_STEP) * LORA_RANK_STEP


def lora_rank(config: ConversionConfig, adapter_rank: int) -> int:
    """The rank the LoRA file is written with: --lora-rank, or by default the adapter's rank rounded
    up to what the runtime takes (smaller ranks are zero-padded exactly)."""
    rank = config.lora_rank if config.lora_rank is not None else runtime_rank(adapter_rank)
    if rank < adapter_rank:
        raise ConversionError(f"--lora-rank {rank} is below the adapter's rank {adapter_rank} ({config.lora_ckpt}); "
                              f"use {runtime_rank(adapter_rank)} or leave --lora-rank out")
    if rank % LORA_RANK_STEP:
        raise ConversionError(f"--lora-rank {rank}: the GPU runtime takes ranks in multiples of {LORA_RANK_STEP} "
                              f"(smaller adapters are zero-padded exactly); use {runtime_rank(rank)}")
    if rank > config.max_rank:
        raise ConversionError(f"--lora-rank {rank} is above --max-rank {config.max_rank}"
                              + ("" if config.lora_rank is not None else f" (the adapter's rank is {adapter_rank})"))
    return rank


def check_lora_supported(family: ModelFamily, model_type: ModelType) -> None:
    """Refuse a LoRA file for a model type whose runtime takes none (merging is the way there)."""
    if not family.lora or not model_type.lora:
        raise ConversionError(f"LoRA is not supported for {model_type.name}: MediaPipe's runtime takes LoRA "
                              f"only for {', '.join(lora_model_type_names())}; merge the adapter into the "
                              "base weights with --merge-lora --merge-unsupported")


def make_plan(config: ConversionConfig) -> ConversionPlan:
    """Validate everything about a conversion and return its plan (nothing is written)."""
    family, model_type = find_model_type(config.model_type)
    if config.backend == "cpu" and family.cpu is None:
        raise ConversionError(f"--backend cpu is not supported for {model_type.name}: litert-torch builds no CPU graph "
                              f"for the {family.name} family here; use --backend gpu")
    if config.backend not in family.backends:
        raise ConversionError(f"--backend {config.backend} is not supported for {model_type.name} "
                              f"(backends: {', '.join(family.backends)})")
    if config.quantization not in family.quantizations:
        raise ConversionError(f"--quantization {config.quantization} is not supported for {model_type.name}")
    checkpoint = Path(config.input_ckpt)
    dims, hf_config = resolve_dims(family, model_type, checkpoint)
    parameters = family.parameters(dims, hf_config)
    source = SplittingSource(open_checkpoint(checkpoint, config.ckpt_format))
    plan = None
    try:
        tokenizer = read_tokenizer(Path(config.vocab_model_file), family, dims)
        notes = apply_special_tokens(parameters, checkpoint_folder(checkpoint), hf_config, tokenizer, model_type.name)
        check_parameters(parameters)
        base = plan_base(family, dims, source, config.quantization)
        check_tied_copies(family, source)
        plan = ConversionPlan(config, family, model_type, dims, parameters.SerializeToString(), tokenizer, source,
                              base, notes=notes, hf_config=hf_config)
        if config.lora_ckpt is not None and config.merge_lora:
            plan.adapter = load_adapter(config.lora_ckpt, family, dims, model_type.name, config.max_adapter_mb,
                                        config.merge_mode, hf_config)
            source.inner = MergedSource(source.inner, plan.adapter.source, plan.adapter.merges,
                                        family)
        elif config.lora_ckpt is not None:
            cpu = config.backend == "cpu"
            (cpu_lora.check_supported if cpu else check_lora_supported)(family, model_type)
            adapter = load_adapter(config.lora_ckpt, family, dims, model_type.name, config.max_adapter_mb,
                                   base_config=hf_config)
            plan.adapter = adapter
            if cpu:
                cpu_lora.check_targets(family, {pair.module for pair in adapter.pairs if pair.a_key})
            rank = (cpu_lora.lora_rank if cpu else lora_rank)(config, adapter.rank)
            plan.config = config = replace(config, lora_rank=rank)
            plan.lora = plan_lora(family, dims, adapter, config.lora_rank, config.mediapipe_compat,
                                  config.effective_lora_scaling == "peft")
    except BaseException:
        source.close()
        if plan is not None and plan.adapter is not None:
            plan.adapter.source.close()
        raise
    return plan
