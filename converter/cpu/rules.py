"""What LoRA the CPU graph takes: the family's q/k/v/o projections, at rank 16 or 32.

Checked while planning (converter/plan.py), before anything is written; lora.py writes the file.
"""
from __future__ import annotations

from ..config import ConversionConfig
from ..errors import ConversionError
from ..models.base import ModelFamily, ModelType

RANKS = (16, 32)  # the LoRA ranks LiteRT-LM's CPU models take; smaller adapters are zero-padded exactly


def check_supported(family: ModelFamily, model_type: ModelType) -> None:
    if family.cpu is None or not family.cpu.lora:
        raise ConversionError(f"--backend cpu takes no LoRA file for {model_type.name}: litert-torch's "
                              f"{family.name} graph has no LoRA inputs; merge the adapter with --merge-lora")


def lora_rank(config: ConversionConfig, adapter_rank: int) -> int:
    """--lora-rank (16 or 32), or the smallest of those that holds the adapter's rank."""
    if config.lora_rank is not None:
        if config.lora_rank not in RANKS:
            raise ConversionError(f"--lora-rank {config.lora_rank}: --backend cpu takes LoRA ranks "
                                  f"{' or '.join(map(str, RANKS))} (smaller adapters are zero-padded exactly)")
        if config.lora_rank < adapter_rank:
            raise ConversionError(f"--lora-rank {config.lora_rank} is below the adapter's rank {adapter_rank} "
                                  f"({config.lora_ckpt})")
        rank = config.lora_rank
    else:
        rank = next((r for r in RANKS if r >= adapter_rank), 0)
        if not rank:
            raise ConversionError(f"the adapter's rank {adapter_rank} ({config.lora_ckpt}) is above {RANKS[-1]}, "
                                  "the largest LoRA rank --backend cpu takes; merge it with --merge-lora")
    if rank > config.max_rank:
        raise ConversionError(f"--lora-rank {rank} is above --max-rank {config.max_rank}")
    return rank


def check_targets(family: ModelFamily, modules: set[str]) -> None:
    """Refuse adapter modules the CPU graph cannot take as LoRA (e.g. MLP projections)."""
    others = sorted(modules - set(family.required_lora))
    if others:
        raise ConversionError(f"--backend cpu takes LoRA on {', '.join(family.required_lora)} only; the adapter "
                              f"also adapts {', '.join(others)}: merge it with --merge-lora --merge-unsupported")
