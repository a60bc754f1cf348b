"""The cache of int8 CPU graph templates (see stream.py): built once per shape and base model.

A template depends on everything litert-torch's graph depends on: the litert-torch and torch
versions, the family and its `ModelConfig` (sizes, soft caps, windows, rotary settings), the
prefill length, KV cache size, LoRA rank (or none) and the base checkpoint's vectors (norm
weights and biases, which litert-torch folds into the graph; a few KB). Not on the matrices:
another adapter merged or given, or other matrix values of the same base, reuse it.

An entry is `<key>.tflite` and `<key>.json` (the key itself, the kinds in marker order, the
template's size and SHA-256) in `$XDG_CACHE_HOME/lora-convert/cpu-graphs` (default
`~/.cache/lora-convert/cpu-graphs`), both written atomically, the JSON last. An entry is used only
when its JSON names this key and the template's hash matches; anything else (missing,
truncated, foreign, a FIFO, unreadable) is a miss and is rebuilt. A cache folder that cannot be
written only costs the rebuild next time.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..files import atomic_output, read_bounded, read_json_object
from ..plan import ConversionPlan
from .graph import read_rows, weight_rows

FORMAT = 1  # of the template and its JSON; bump when stream.py's marking changes
MAX_TEMPLATE_BYTES = 1 << 36  # a template holds one layer and the embedding
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # in reprs of functions (ModelConfig.build_rope)


@dataclass(frozen=True)
class Template:
    data: bytes
    kinds: list[str]


def folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-convert" / "cpu-graphs"


def graph_key(plan: ConversionPlan, model_config: Any) -> dict:
    """Everything the template depends on (see the module docstring)."""
    vectors = hashlib.sha256()
    for name, rows in sorted(weight_rows(plan, model_config).items()):
        if all(len(plan.source.info(source).shape) == 1 for source, _, _ in rows):
            vectors.update(name.encode() + b"\0" + read_rows(plan, rows).numpy().tobytes())
    config = plan.config
    return {"format": FORMAT, "litert-torch": version("litert-torch"), "torch": torch.__version__,
            "family": plan.family.name, "model_config": _ADDRESS.sub("", repr(model_config)),
            "quantization": config.quantization, "prefill_length": config.cpu_prefill_length,
            "kv_cache_size": config.cpu_kv_cache_size, "lora_rank": config.lora_rank if plan.lora is not None else None,
            "vectors": vectors.hexdigest()}


def _paths(where: Path, key: dict) -> tuple[Path, Path]:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return where / f"{name}.tflite", where / f"{name}.json"


def load(where: Path, key: dict) -> Template | None:
    """The cached template for `key`, or None (a miss: absent, foreign or damaged)."""
    template, meta = _paths(where, key)
    try:
        entry = read_json_object(meta)
        size = entry.get("size")
        if entry.get("key") != key or not isinstance(size, int) or not 0 < size <= MAX_TEMPLATE_BYTES:
            return None
        data = read_bounded(template, None, size)
    except ConversionError:
        return None
    kinds = entry.get("kinds")
    if len(data) != size or entry.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    if not isinstance(kinds, list) or not kinds or not all(isinstance(kind, str) for kind in kinds):
        return None
    return Template(data, kinds)


def store(where: Path, key: dict, template: Template) -> bool:
    """Write the entry (template, then its JSON); False when the folder cannot take it."""
    path, meta = _paths(where, key)
    entry = {"key": key, "kinds": template.kinds, "size": len(template.data),
             "sha256": hashlib.sha256(template.data).hexdigest()}
    try:
        with atomic_output(path) as handle:
            handle.write(template.data)
        with atomic_output(meta) as handle:
            handle.write(json.dumps(entry, indent=1).encode())
    except ConversionError:
        return False
    return True
