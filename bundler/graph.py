"""A LiteRT-LM CPU graph (`lora-convert --backend cpu`): a TFLite model with prefill/decode signatures.

Only the flatbuffer's signatures and tensor shapes are read (the file is mapped, not loaded): the
vocabulary (decode's `logits`), the LoRA rank the graph takes (its `lora_` inputs), and whether
the file is such a graph at all (GPU weights files have no signatures).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from converter.errors import ConversionError

DECODE = "decode"
LORA_PREFIX = "lora_atten_"
MAX_ENTRIES = 1 << 16  # signatures, or tensors of one signature: far above any real graph's


@dataclass(frozen=True)
class CpuGraphInfo:
    signatures: tuple[str, ...]
    vocab_size: int
    lora_rank: int | None  # the rank of its LoRA inputs; None: it takes no LoRA
    lora_inputs: dict[str, tuple[int, ...]]  # LoRA input name -> shape


def _model(path: Path, offset: int = 0, size: int | None = None) -> schema.Model | None:
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=None if size is None else (size,))
    if len(data) < 8 or bytes(data[4:8]) != b"TFL3":
        return None
    return schema.Model.GetRootAs(data, 0)


def is_cpu_graph(path: Path) -> bool:
    """A TFLite file with signatures (GPU weights files have none); a malformed file is not one (the
    weights reader then says what is wrong with it)."""
    try:
        model = _model(path)
        return model is not None and 0 < model.SignatureDefsLength() <= MAX_ENTRIES
    except Exception:  # flatbuffers raises whatever hostile offsets lead it to (struct.error, IndexError, ...)
        return False


def read_cpu_graph(path: Path, offset: int = 0, size: int | None = None) -> CpuGraphInfo:
    """The graph's signatures, vocabulary and LoRA inputs (of the file, or of `size` bytes at
    `offset` in a .litertlm); refuse one without prefill and decode signatures, or a malformed one."""
    try:
        return _read_cpu_graph(path, offset, size)
    except ConversionError:
        raise
    except Exception as error:  # the generated reader trusts every offset: a hostile file raises anything
        raise ConversionError(f"{path}: a malformed TFLite graph ({type(error).__name__}: {error})"[:300]) from None


def _counted(count: int, what: str, path: Path) -> range:
    if not 0 <= count <= MAX_ENTRIES:
        raise ConversionError(f"{path}: a malformed TFLite graph ({count} {what})")
    return range(count)


def _read_cpu_graph(path: Path, offset: int, size: int | None) -> CpuGraphInfo:
    model = _model(path, offset, size)
    if model is None:
        raise ConversionError(f"{path}: not a TFLite file")
    signatures = {}
    for i in _counted(model.SignatureDefsLength(), "signatures", path):
        signature = model.SignatureDefs(i)
        signatures[signature.SignatureKey().decode()] = signature
    if DECODE not in signatures or not any(name.startswith("prefill") for name in signatures):
        raise ConversionError(f"{path}: a CPU graph needs prefill and decode signatures; it has "
                              f"{', '.join(signatures) or 'none'} (convert with lora-convert --backend cpu)")
    decode = signatures[DECODE]
    graph = model.Subgraphs(decode.SubgraphIndex())

    def tensors(count: int, get) -> dict[str, tuple[int, ...]]:
        maps = (get(j) for j in _counted(count, "signature tensors", path))
        return {m.Name().decode(): tuple(graph.Tensors(m.TensorIndex()).ShapeAsNumpy().tolist()) for m in maps}

    outputs = tensors(decode.OutputsLength(), decode.Outputs)
    inputs = tensors(decode.InputsLength(), decode.Inputs)
    if "logits" not in outputs:
        raise ConversionError(f"{path}: its decode signature has no logits output")
    lora_inputs = {name: shape for name, shape in inputs.items() if name.startswith(LORA_PREFIX)}
    ranks = {shape[-1] for name, shape in lora_inputs.items() if "_a_prime_" in name}
    if len(ranks) > 1:
        raise ConversionError(f"{path}: its LoRA inputs have different ranks ({sorted(ranks)})")
    return CpuGraphInfo(tuple(signatures), outputs["logits"][-1], ranks.pop() if ranks else None, lora_inputs)
