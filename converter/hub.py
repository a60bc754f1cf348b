"""Hugging Face hub ids (`owner/name[@revision]`) for --input-ckpt / --lora-ckpt, through `huggingface_hub`:
its cache (HF_HOME, HF_HUB_CACHE), its offline mode (HF_HUB_OFFLINE) and only the files we read."""
from __future__ import annotations

import re
from pathlib import Path

from .config import CKPT_FORMATS
from .detect import formats_present
from .errors import ConversionError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]+))?")
MODEL_FILES = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer*"]
WEIGHT_FILES = {"safetensors": ["*.safetensors", "*.safetensors.index.json"],
                "pytorch": ["*.bin", "*.pt", "*.pth", "*.bin.index.json"]}
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def hub_id(value: str | Path | None) -> re.Match | None:
    """The id and revision when `value` is no local path and has the hub's `owner/name[@revision]` syntax."""
    if value is None or Path(value).exists():
        return None
    text = str(value)
    match = HUB_ID.fullmatch(text)
    return match if match and ".." not in text and "--" not in text else None


def download(match: re.Match, option: str, patterns: list[str]) -> str:
    """The local snapshot folder of a hub id, fetched (or found in the cache) with `patterns` only."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise ConversionError(f"{option} {match.group(0)}: not a local path; hub ids need huggingface_hub "
                              f"(pip install huggingface_hub)") from None
    try:
        return huggingface_hub.snapshot_download(match["repo"], revision=match["revision"], allow_patterns=patterns)
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError) and constants.HF_HUB_OFFLINE:
            reason = f"not in the Hugging Face cache {constants.HF_HUB_CACHE}, and HF_HUB_OFFLINE is set"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{option} {match.group(0)}: no such local path, and as a Hugging Face hub id: "
                              f"{reason}") from None


def checkpoint_path(value: str | None, ckpt_format: str | None) -> str | None:
    """--input-ckpt as a local path: a hub id becomes its snapshot folder with the config, tokenizer and
    weights of `ckpt_format` (without one: safetensors, or PyTorch when the repository has none)."""
    match = hub_id(value)
    if match is None:
        return value
    for fmt in [ckpt_format] if ckpt_format else CKPT_FORMATS:
        folder = download(match, "--input-ckpt", MODEL_FILES + WEIGHT_FILES[fmt])
        if formats_present(folder):
            break
    return folder  # without weights: the checkpoint reader says what is missing


def adapter_path(value: str | None, option: str = "--lora-ckpt") -> str | None:
    """--lora-ckpt (or --check-adapter) as a local path: a hub id becomes its PEFT adapter snapshot folder."""
    match = hub_id(value)
    return value if match is None else download(match, option, ADAPTER_FILES)
