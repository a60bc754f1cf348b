"""What the checkpoint's files imply when an option is left out: `--ckpt-format` and `--model-type`."""
from __future__ import annotations

import glob
from dataclasses import replace
from pathlib import Path

from .checkpoint import SUFFIXES, TRAINING_STATE
from .config import CKPT_FORMATS
from .errors import ConversionError
from .files import read_json_object
from .models import FAMILIES
from .models.base import dims_from_config

INDEX_SUFFIXES = {"safetensors": ".safetensors.index.json", "pytorch": ".bin.index.json"}


def _format_of(file: Path) -> str | None:
    for ckpt_format in CKPT_FORMATS:
        if file.name.endswith(INDEX_SUFFIXES[ckpt_format]) or file.suffix in SUFFIXES[ckpt_format]:
            return ckpt_format
    return None


def formats_present(path: str | Path) -> list[str]:
    """The checkpoint formats whose files `path` (a file, a folder or a glob) holds, safetensors first."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if "adapter" not in p.name and not TRAINING_STATE.match(p.name)]
    elif path.exists():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path))]
    found = {_format_of(file) for file in files}
    return [ckpt_format for ckpt_format in CKPT_FORMATS if ckpt_format in found]


def resolve_ckpt_format(path: str | Path, given: str | None) -> str:
    """`--ckpt-format` as given (refused when the files are of the other format only), or detected:
    safetensors where present (Hugging Face repositories often hold both), else PyTorch."""
    present = formats_present(path)
    if given is None:
        return present[0] if present else "safetensors"  # nothing recognisable: the reader says what is missing
    if present and given not in present:
        raise ConversionError(f"--ckpt-format {given} contradicts --input-ckpt {path}, which holds {present[0]} "
                              f"files ({', '.join(SUFFIXES[present[0]])}); drop --ckpt-format or give {present[0]}")
    return given


def infer_model_type(checkpoint: str | Path) -> str:
    """The one model type `config.json` (beside or in `checkpoint`) fits: its `model_type` picks the
    family, then the sizes pick the type whose checkpoints have them (the vocabulary may differ: a
    fine-tune can add tokens), or the family's only type. Anything else is one line naming the candidates."""
    checkpoint = Path(checkpoint)
    path = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
    if not path.is_file():
        raise ConversionError(f"--model-type is required: no {path} to infer it from")
    config = read_json_object(path)
    hf_type = config.get("model_type")
    families = [f for f in FAMILIES if isinstance(hf_type, str) and hf_type in f.hf_model_types]
    if not families:
        known = sorted({t for f in FAMILIES for t in f.hf_model_types})
        raise ConversionError(f"{path}: model_type {hf_type!r} is none of {', '.join(known)}; cannot infer "
                              f"--model-type")
    candidates = [t for f in families for t in f.model_types]
    matching = []
    for family in families:
        dims = dims_from_config(family, config, str(path))
        matching += [t for t in family.model_types if replace(t.reference, vocab_size=dims.vocab_size) == dims]
    if len(matching) == 1:
        return matching[0].name
    if not matching and len(candidates) == 1:
        return candidates[0].name
    names = ", ".join(t.name for t in matching or candidates)
    raise ConversionError(f"{path}: model_type {hf_type!r} with these sizes could be {names}; give --model-type")
