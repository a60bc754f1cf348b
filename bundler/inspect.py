"""Describe a .task bundle, a GPU weights .bin (ours or MediaPipe's) or a .litertlm as a plain dict."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import sentencepiece as spm
from google.protobuf.json_format import MessageToDict

from converter.files import regular_file
from converter.hf_tokenizer import parse_tokenizer_json
from converter.tflite import SPM_VOCAB_MODEL, TYPE_NAMES, WeightFile
from converter.proto import llm_params_pb2
from converter.tokenizer import parse_sentencepiece

from . import litertlm
from .graph import read_cpu_graph
from .task import TOKENIZER_ENTRY, file_kind, open_weights

LORA_NAME = re.compile(r"x_layers_(\d+)\.(.+)\.w_prime_(?:left|right)$")
MODEL_TYPES = {v: k.removeprefix("LLM_MODEL_TYPE_") for k, v in llm_params_pb2.LlmModelType.items()}
HASH_BLOCK = 16 << 20


def sha256(path: Path, offset: int = 0, size: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        left = size if size is not None else path.stat().st_size - offset
        while left > 0:
            block = handle.read(min(HASH_BLOCK, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def describe_weights(weights: WeightFile) -> dict:
    by_type = Counter()
    for entry in weights.tensors.values():
        by_type[TYPE_NAMES.get(entry.type, str(entry.type))] += entry.nbytes
    lora = [LORA_NAME.search(name) for name in weights.tensors]
    targets = sorted({m.group(2) for m in lora if m})
    parameters = weights.parameters
    return {
        "model_type": MODEL_TYPES.get(weights.metadata.get("odml.infra.LlmModelType"), weights.subgraph_name),
        "backend": (weights.metadata.get("backend") or b"").decode(errors="replace"),
        "tensors": len(weights.tensors),
        "bytes_by_dtype": dict(sorted(by_type.items())),
        "lora_rank": weights.lora_rank,
        "lora_targets": targets,
        "lora_layers": len({m.group(1) for m in lora if m}),
        "parameters": MessageToDict(parameters, preserving_proto_field_name=True),
    }


def describe_tokenizer(model: bytes, where: str) -> tuple[dict, spm.SentencePieceProcessor]:
    """Size and hash of the SentencePiece model found at `where` (file and entry, for errors)."""
    processor = parse_sentencepiece(model, where)
    return {"vocab_size": processor.vocab_size(), "sha256": hashlib.sha256(model).hexdigest()}, processor


def piece(processor: spm.SentencePieceProcessor, token_id: int) -> str:
    """The piece of a start token id, or a note when the tokenizer has no such id."""
    if 0 <= token_id < processor.vocab_size():
        return processor.id_to_piece(token_id)
    return f"<id {token_id}: not in the tokenizer>"


def describe_litertlm(path: Path, with_hashes: bool) -> dict:
    """A .litertlm's sections, model section (GPU weights as a .bin's; a CPU graph's signatures,
    vocabulary and LoRA inputs), tokenizer, start/stop token ids and prompt templates."""
    litertlm.check_complete(path, "PATH")
    types = {value: name for name, value in vars(litertlm.schema.AnySectionDataType).items() if not name.startswith("_")}
    result: dict = {"path": str(path), "size": path.stat().st_size, "format": "litertlm"}
    if with_hashes:
        result["sha256"] = sha256(path)
    result["sections"] = [{"type": types.get(s.dataType, str(s.dataType)), "offset": s.beginOffset,
                           "size": s.endOffset - s.beginOffset,
                           **({"sha256": sha256(path, s.beginOffset, s.endOffset - s.beginOffset)} if with_hashes else {})}
                          for s in litertlm._sections(path)]
    model_type, begin, end = litertlm.model_section(path)
    if model_type == "tf_lite_prefill_decode":
        graph = read_cpu_graph(path, begin, end - begin)
        result["model"] = {"model_type": model_type, "backend": "cpu", "signatures": list(graph.signatures),
                           "vocab_size": graph.vocab_size, "lora_rank": graph.lora_rank,
                           "lora_inputs": len(graph.lora_inputs)}
    else:
        result["model"] = {**describe_weights(WeightFile(path, begin, end - begin)), "model_type": model_type}
    spm_model, hf_json = litertlm.sentencepiece_model(path), litertlm.hf_tokenizer_json(path)
    if spm_model is not None:
        result["tokenizer"] = {"kind": "sentencepiece", **describe_tokenizer(spm_model, f"{path}: its tokenizer")[0]}
    elif hf_json is not None:
        hf = parse_tokenizer_json(hf_json, path, "its Hugging Face tokenizer section:")
        result["tokenizer"] = {"kind": "huggingface", "vocab_size": hf.size, "sha256": hashlib.sha256(hf_json).hexdigest()}
    metadata = litertlm.read_llm_metadata(path)
    result["start_token"] = list(metadata.start_token.token_ids.ids) if metadata.HasField("start_token") else None
    result["stop_tokens"] = [list(token.token_ids.ids) for token in metadata.stop_tokens]
    result["prompt_templates"] = MessageToDict(metadata.prompt_templates, preserving_proto_field_name=True)
    return result


def litertlm_text(info: dict) -> str:
    """The human-readable form of `describe_litertlm`."""
    lines = [f"{info['path']}: litertlm, {info['size']:,} bytes" + (f", sha256 {info['sha256']}" if "sha256" in info else "")]
    for s in info["sections"]:
        lines.append(f"  section {s['type']:24} offset {s['offset']:>12,} size {s['size']:>14,}"
                     + (f"  sha256 {s['sha256']}" if "sha256" in s else ""))
    model = info["model"]
    if model["backend"] == "cpu":
        lora = f"LoRA rank {model['lora_rank']} ({model['lora_inputs']} inputs)" if model["lora_rank"] else "no LoRA inputs"
        lines.append(f"model {model['model_type']}: signatures {', '.join(model['signatures'])}, vocab size "
                     f"{model['vocab_size']}, {lora}")
    else:
        lines.append(f"model {model['model_type']}: {model['tensors']} tensors, vocab size "
                     f"{model['parameters'].get('vocab_size')}")
    tokenizer = info.get("tokenizer")
    if tokenizer:
        lines.append(f"tokenizer {tokenizer['kind']}, {tokenizer['vocab_size']} ids (sha256 {tokenizer['sha256'][:16]}...)")
    lines.append(f"start token ids {info['start_token']}, stop token ids {info['stop_tokens']}")
    if info["prompt_templates"]:
        lines.append(f"prompt templates {info['prompt_templates']!r}")
    return "\n".join(lines)


def describe(path: Path, with_hashes: bool = True) -> dict:
    """Everything worth knowing about a .task, weights file or .litertlm, JSON-ready."""
    path = Path(path)
    if file_kind(regular_file(path)) == "litertlm":
        return describe_litertlm(path, with_hashes)
    weights, task = open_weights(path)
    result = {"path": str(path), "size": path.stat().st_size}
    if with_hashes:
        result["sha256"] = sha256(path)
    if task is not None:
        metadata = task.metadata()
        result["format"] = "task"
        result["entries"] = [
            {"name": e.name, "offset": e.offset, "size": e.size,
             **({"sha256": sha256(path, e.offset, e.size)} if with_hashes else {})}
            for e in task.entries.values()
        ]
        tokenizer, processor = describe_tokenizer(task.read(TOKENIZER_ENTRY), f"{path}: entry {TOKENIZER_ENTRY}")
        result["bundle"] = MessageToDict(metadata, preserving_proto_field_name=True)
        start, stops = metadata.start_token, list(metadata.stop_tokens)
    else:
        result["format"] = "weights"
        tokenizer, processor = describe_tokenizer(weights.metadata.get(SPM_VOCAB_MODEL) or b"",
                                                  f"{path}: metadata {SPM_VOCAB_MODEL}")
        parameters = weights.parameters
        start = piece(processor, parameters.start_token_id) if parameters.HasField("start_token_id") else \
            parameters.start_token
        stops = list(parameters.stop_tokens)
    result["model"] = describe_weights(weights)
    result["tokenizer"] = tokenizer
    result["start_token"] = start
    result["stop_tokens"] = stops
    return result


def format_text(info: dict) -> str:
    """The human-readable form of `describe`."""
    if info["format"] == "litertlm":
        return litertlm_text(info)
    model = info["model"]
    lines = [f"{info['path']}: {info['format']}, {info['size']:,} bytes" +
             (f", sha256 {info['sha256']}" if "sha256" in info else "")]
    for entry in info.get("entries", []):
        lines.append(f"  entry {entry['name']:24} offset {entry['offset']:>12,} size {entry['size']:>14,}"
                     + (f"  sha256 {entry['sha256']}" if "sha256" in entry else ""))
    lines.append(f"model type {model['model_type']}, backend {model['backend']}, {model['tensors']} tensors")
    lines.append("bytes by dtype: " + ", ".join(f"{k} {v:,}" for k, v in model["bytes_by_dtype"].items()))
    if model["lora_rank"] is not None:
        lines.append(f"LoRA rank {model['lora_rank']} on {model['lora_layers']} layers: {', '.join(model['lora_targets'])}")
    t = model["parameters"].get("transformer_parameters", {})
    if t:
        lines.append("transformer: " + ", ".join(f"{k}={v}" for k, v in t.items() if not isinstance(v, dict)))
    lines.append(f"vocab size {model['parameters'].get('vocab_size')}, tokenizer {info['tokenizer']['vocab_size']} "
                 f"pieces (sha256 {info['tokenizer']['sha256'][:16]}...)")
    lines.append(f"start token {info['start_token']!r}, stop tokens {info['stop_tokens']!r}")
    template = info.get("bundle", {}).get("prompt_template")
    if template:
        lines.append(f"prompt template {template!r}")
    return "\n".join(lines)
