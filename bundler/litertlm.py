""".litertlm: the same GPU weights, tokenizer and start/stop tokens for LiteRT-LM.

Written with Google's `litert-lm-builder`. LiteRT-LM runs a MediaPipe GPU weights file when it
is a TFLiteModel section of type `tf_lite_artisan_text_decoder` (its "GPU artisan" executor),
next to a SentencePiece tokenizer section and an LlmMetadata section with the token ids.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import litert_lm_builder as builder
from litert_lm_builder.runtime.proto import llm_metadata_pb2

from converter.files import atomic_output

from .config import BundleConfig

AUTHORS = "lora-convert"


def llm_metadata(config: BundleConfig, start_id: int, stop_ids: list[int]) -> llm_metadata_pb2.LlmMetadata:
    metadata = llm_metadata_pb2.LlmMetadata()
    metadata.start_token.token_ids.ids.append(start_id)
    for stop_id in stop_ids:
        metadata.stop_tokens.add().token_ids.ids.append(stop_id)
    if config.prompt_prefix or config.prompt_suffix:
        metadata.prompt_templates.user.prefix = config.prompt_prefix or ""
        metadata.prompt_templates.user.suffix = config.prompt_suffix or ""
    if config.system_prompt:
        metadata.prompt_templates.system.prefix = config.system_prompt
    return metadata


def write_litertlm(config: BundleConfig, start_id: int, stop_ids: list[int], path: Path) -> None:
    """Build the container atomically (the builder reads the metadata from a file)."""
    with tempfile.TemporaryDirectory() as scratch, atomic_output(path) as handle:
        metadata_path = Path(scratch) / "llm_metadata.pb"
        metadata_path.write_bytes(llm_metadata(config, start_id, stop_ids).SerializeToString())
        file = builder.LitertLmFileBuilder()
        file.add_system_metadata(builder.Metadata(key="Authors", value=AUTHORS, dtype=builder.DType.STRING))
        file.add_tflite_model(str(config.tflite_model), builder.TfLiteModelType.ARTISAN_TEXT_DECODER)
        file.add_sentencepiece_tokenizer(str(config.tokenizer_model))
        file.add_llm_metadata(str(metadata_path))
        file.build(handle)
