"""`adapter_config.json`: read, every value this converter uses checked for type and range, and
PEFT variants that do not compute plain LoRA's `W x + alpha / r * B (A x)` refused with the reason.

Values follow PEFT's `LoraConfig`; keys this converter does not use are ignored. A missing file
is an empty config (a bare tensor file: scale 1); a file that exists but cannot be read is an
error, never ignored (its alpha would be lost).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError
from .files import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
# init_lora_weights values whose training subtracts the initial adapter from the base weights: the
# saved adapter belongs to that residual base, not to the checkpoint being converted.
MAX_RANK = 2**20  # far above any real adapter; keeps absurd values out of messages and arithmetic
RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
CONVERTED = ("save it with save_pretrained(..., path_initial_model_for_weight_conversion=...), which turns it into "
             "plain LoRA for the original base, or, if --input-ckpt is that residual model, set init_lora_weights "
             "to true")
# Config values (key, what PEFT does with them) that plain LoRA on the runtime cannot reproduce.
VARIANTS = (
    ("alora_invocation_tokens", "activated LoRA applies the adapter only from its invocation tokens on, the runtime "
                                "applies LoRA to every token (and PEFT cannot merge it)"),
    ("lora_bias", "lora_B has a bias, which the runtime's LoRA and this converter's merge do not take"),
    ("layer_replication", "it stacks replicated layers, so the adapted model has more layers than the base"),
    ("use_qalora", "QA-LoRA applies lora_A to group-pooled inputs"),
    ("trainable_token_indices", "trainable token rows of the embedding are not converted"),
    ("target_parameters", "LoRA on nn.Parameter targets is not converted"),
    ("use_bdlora", "block-diagonal LoRA is not converted"),
    ("arrow_config", "Arrow routes between several adapters per token"),
    ("kasa_config", "KaSA truncates the base weights and adds a singular-value diagonal between A and B"),
    ("monteclora_config", "MonteCLoRA samples its adapter weights"),
)

PEFT_DEFAULT_ALPHA = 8.0  # LoraConfig.lora_alpha when adapter_config.json does not give it


@dataclass(frozen=True)
class AdapterConfig:
    """What the converter reads from `adapter_config.json`, checked."""

    file: Path
    r: int | None = None
    lora_alpha: float | None = None  # None (no config file): scale 1 (alpha = rank), as for a bare tensor file
    alpha_defaulted: bool = False  # the config has no lora_alpha: PEFT's default (PEFT_DEFAULT_ALPHA) applies
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    ensure_weight_tying: bool = False
    target_modules: tuple[str, ...] | str | None = None  # a list, or one regex PEFT full-matches
    base_model: str | None = None
    model_type: str | None = None  # Workers-AI style configs name the base architecture

    def rank(self, module: str) -> int | None:
        """The rank PEFT gives `module` (PEFT's module name, e.g. `model.layers.0.self_attn.q_proj`)."""
        return pattern_value(self.rank_pattern, module, self.r)

    def scale(self, module: str, rank: int) -> float:
        """PEFT's `scaling` for `module`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = pattern_value(self.alpha_pattern, module, self.lora_alpha if self.lora_alpha is not None else rank)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def zero_alphas(self) -> list[str]:
        """`lora_alpha` / `alpha_pattern` entries that are 0 (PEFT's scale is then 0)."""
        zero = ["lora_alpha"] if self.lora_alpha == 0 else []
        return zero + [f"alpha_pattern[{key!r}]" for key, alpha in self.alpha_pattern.items() if alpha == 0]


def pattern_value(pattern: dict, module: str, default):
    """PEFT's `get_pattern_key`: the first key that matches a module name ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(file: Path) -> AdapterConfig:
    """The checked config at `file`; an empty one when there is no such file."""
    if not os.path.lexists(file):
        return AdapterConfig(file)
    if not file.is_file():  # a folder, a FIFO (reading it would hang), a dangling link
        raise ConversionError(f"{file}: not a regular file; expected the adapter's JSON config")
    raw = read_json_object(file)
    config = AdapterConfig(
        file,
        r=_rank(file, raw),
        lora_alpha=_alpha(file, raw),
        alpha_defaulted="lora_alpha" not in raw,
        rank_pattern=_pattern(file, raw, "rank_pattern", _positive_int),
        alpha_pattern=_pattern(file, raw, "alpha_pattern", _finite),
        use_rslora=_flag(file, raw, "use_rslora"),
        use_dora=_flag(file, raw, "use_dora"),
        ensure_weight_tying=_flag(file, raw, "ensure_weight_tying"),
        target_modules=_target_modules(file, raw.get("target_modules")),
        base_model=_text(file, raw, "base_model_name_or_path"),
        model_type=_text(file, raw, "model_type"),
    )
    _refuse_variants(file, raw)
    _check_module_lists(file, raw)
    return config


def _check_module_lists(file: Path, raw: dict) -> None:
    """Keys we only read through the tensors they produce, checked to hold what PEFT writes there."""
    def is_ints(value: object) -> bool:
        items = value if isinstance(value, list) else [value]
        return all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in items)

    def is_strings(value: object) -> bool:
        return isinstance(value, str) or isinstance(value, list) and all(isinstance(item, str) for item in value)

    for key, valid, expected in (("modules_to_save", is_strings, "a list of module names"),
                                 ("layers_to_transform", is_ints, "a layer index or a list of them"),
                                 ("layers_pattern", is_strings, "a module name or a list of them")):
        value = raw.get(key)
        if value is not None and not valid(value):
            raise _error(file, key, expected, value)


def _shown(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(file: Path, key: str, expected: str, value: object) -> ConversionError:
    return ConversionError(f"{file}: {key} must be {expected}, got {_shown(value)}")


def _positive_int(file: Path, key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise _error(file, key, f"a positive integer up to {MAX_RANK} (the LoRA rank)", value)
    return value


def _rank(file: Path, raw: dict) -> int | None:
    """`r`: absent means "read the rank from the tensors"; null is not a rank."""
    if "r" in raw and raw["r"] is None:
        raise _error(file, "r", f"a positive integer up to {MAX_RANK} (the LoRA rank)", None)
    return _positive_int(file, "r", raw.get("r"))


def _finite(file: Path, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > sys.float_info.max \
            or not math.isfinite(value):
        raise _error(file, key, "a finite number", value)
    return float(value)


def _alpha(file: Path, raw: dict) -> float:
    """`lora_alpha`, or PEFT's default when the config leaves it out (PEFT loads such a config so)."""
    return _finite(file, "lora_alpha", raw["lora_alpha"]) if "lora_alpha" in raw else PEFT_DEFAULT_ALPHA


def _pattern(file: Path, raw: dict, key: str, check) -> dict:
    """rank_pattern / alpha_pattern: an object of PEFT module regexes to values."""
    pattern = raw.get(key)
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise _error(file, key, "an object of module names to values", pattern)
    checked = {}
    for name, value in pattern.items():
        try:
            re.compile(rf"(.*\.)?({name})$")
        except re.error as exc:
            raise _error(file, f"{key} key {name!r}", f"a valid regular expression ({exc})", name) from None
        if value is None:
            raise _error(file, f"{key}[{name!r}]", "a number", value)
        checked[name] = check(file, f"{key}[{name!r}]", value)
    return checked


def _flag(file: Path, raw: dict, key: str) -> bool:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise _error(file, key, "true or false", value)
    return bool(value)


def _text(file: Path, raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise _error(file, key, "a string", value)
    return value or None


def _target_modules(file: Path, value: object) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return tuple(value)
    raise _error(file, "target_modules", "a list of module names or one regular expression", value)


def _refuse_variants(file: Path, raw: dict) -> None:
    """Refuse what converting as plain LoRA would silently get wrong, naming the key and the reason."""
    peft_type = raw.get("peft_type")
    if peft_type is not None and peft_type != "LORA":
        raise ConversionError(f"{file}: peft_type {_shown(peft_type)} is not LoRA; only LoRA adapters (peft_type "
                              f"\"LORA\") can be converted")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise ConversionError(f"{file}: init_lora_weights {_shown(init)} trains against a residual base (PEFT "
                              f"subtracts the initial adapter from the base weights), so on the original base it "
                              f"computes something else; {CONVERTED}")
    for key, reason in VARIANTS:
        if raw.get(key) not in (None, False, [], {}):
            raise ConversionError(f"{file}: {key} is set ({_shown(raw[key])}): {reason}, so it cannot be converted "
                                  f"as plain LoRA")
