"""Check a bundle's inputs against each other, then write it as .task or .litertlm."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from converter.errors import ConversionError
from converter.files import check_output, refuse_overwrite, regular_file
from converter.models import find_model_type
from converter.tflite import WeightFile
from converter.tokenizer import check_tokenizer_size, load_tokenizer

from .config import BundleConfig
from .graph import CpuGraphInfo, is_cpu_graph, read_cpu_graph
from .task import METADATA_ENTRY, MODEL_ENTRY, TOKENIZER_ENTRY, bundle_metadata, file_kind, write_zip


@dataclass(frozen=True)
class CheckedInputs:
    model: WeightFile | CpuGraphInfo
    tokenizer: spm.SentencePieceProcessor
    tokenizer_bytes: bytes  # the SentencePiece model (converted when --tokenizer-model is a folder)
    start_id: int
    stop_ids: list[int]


def token_id(tokenizer: spm.SentencePieceProcessor, token: str, option: str, path: Path) -> int:
    """The id of a piece that must exist as a whole piece in the tokenizer."""
    piece_id = tokenizer.piece_to_id(token)
    if tokenizer.id_to_piece(piece_id) != token:
        raise ConversionError(f"{option} {token!r} is not a piece of the tokenizer {path}")
    return piece_id


def untokenized_rows(model_type: str) -> int:
    """Embedding rows of the model type's family that no tokenizer piece names (0 for unknown types)."""
    try:
        family, _ = find_model_type(model_type)
    except ConversionError:
        return 0
    return family.untokenized_rows


def check_inputs(config: BundleConfig) -> CheckedInputs:
    """The model must be a GPU weights file (base, not LoRA), the tokenizer a SentencePiece
    model (or a Hugging Face tokenizer folder, converted as lora-convert does) with the model's
    vocabulary (`check_tokenizer_size`), and the start/stop tokens pieces of it."""
    model_path, tokenizer_path = Path(config.tflite_model), Path(config.tokenizer_model)
    regular_file(model_path, "--tflite-model")
    kind = file_kind(model_path)
    if kind != "weights":
        raise ConversionError(f"--tflite-model {model_path} is a .{kind} bundle; give the GPU weights .bin "
                              "or CPU graph .tflite from lora-convert")
    model: WeightFile | CpuGraphInfo
    if is_cpu_graph(model_path):
        if config.format != "litertlm":
            raise ConversionError(f"--tflite-model {model_path} is a CPU graph (lora-convert --backend cpu), which "
                                  "LiteRT-LM runs: use --format litertlm")
        model = read_cpu_graph(model_path)
        vocab_size, rows = model.vocab_size, 0
    else:
        model = WeightFile(model_path)
        if model.lora_rank is not None:
            raise ConversionError(f"--tflite-model {model_path} is a LoRA weights file (rank {model.lora_rank}); "
                                  "bundle the base model and ship LoRA files beside it")
        vocab_size, rows = model.parameters.vocab_size, untokenized_rows(model.subgraph_name)
    if config.format == "litertlm" and tokenizer_path.is_dir():
        raise ConversionError(f"--tokenizer-model {tokenizer_path} is a folder; .litertlm takes a SentencePiece "
                              ".model file (a Hugging Face tokenizer folder works for .task bundles)")
    tokenizer_bytes, tokenizer = load_tokenizer(tokenizer_path, "--tokenizer-model")
    if vocab_size:
        check_tokenizer_size(tokenizer_bytes, tokenizer.vocab_size(), vocab_size, rows,
                             f"--tokenizer-model {tokenizer_path}", str(model_path))
    start_id = token_id(tokenizer, config.start_token, "--start-token", tokenizer_path)
    stop_ids = [token_id(tokenizer, token, "--stop-tokens", tokenizer_path) for token in config.stop_tokens]
    return CheckedInputs(model, tokenizer, tokenizer_bytes, start_id, stop_ids)


def write_bundle(config: BundleConfig) -> Path:
    """Validate and write the bundle; returns its path."""
    path = check_output(config.output_path, "--output-filename")
    checked = check_inputs(config)
    # The name as given too: naming an input there is a mistake even though the suffix would spare it.
    given = Path(config.output_filename)
    refuse_overwrite([("--output-filename", p) for p in dict.fromkeys((path, given))],
                     [("--tflite-model", config.tflite_model), ("--tokenizer-model", config.tokenizer_model)])
    if config.format == "litertlm":
        from .litertlm import write_litertlm

        write_litertlm(config, checked.start_id, checked.stop_ids, path, cpu=isinstance(checked.model, CpuGraphInfo))
        return path
    metadata = bundle_metadata(config.start_token, list(config.stop_tokens), config.enable_bytes_to_unicode_mapping,
                               config.system_prompt, config.prompt_prefix, config.prompt_suffix)
    write_zip(path, [(MODEL_ENTRY, Path(config.tflite_model)), (TOKENIZER_ENTRY, checked.tokenizer_bytes),
                     (METADATA_ENTRY, metadata)])
    return path
