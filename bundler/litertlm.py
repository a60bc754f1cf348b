""".litertlm: the GPU weights or the CPU graph, tokenizer and start/stop tokens for LiteRT-LM.

Written with Google's `litert-lm-builder`. LiteRT-LM runs a MediaPipe GPU weights file when it
is a TFLiteModel section of type `tf_lite_artisan_text_decoder` (its "GPU artisan" executor), and
a CPU graph (`lora-convert --backend cpu`: prefill/decode signatures) when it is one of type
`tf_lite_prefill_decode` (its CPU executor, XNNPACK), next to a SentencePiece tokenizer section
and an LlmMetadata section with the token ids and prompt template.

The builder stamps a random `uuid` and the wall-clock `creation_timestamp` into the header's
system metadata and offers no way to set them. We rewrite the header (parsed and packed with the
builder's own flatbuffers schema) with a uuid derived from the sections' bytes and a fixed
timestamp, so the same inputs give the same file, byte for byte.
"""
from __future__ import annotations

import hashlib
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

import flatbuffers
import litert_lm_builder as builder
from litert_lm_builder import litertlm_core
from litert_lm_builder import litertlm_header_schema_py_generated as schema
from litert_lm_builder.runtime.proto import llm_metadata_pb2

from converter.errors import ConversionError
from converter.files import atomic_output

from .config import BundleConfig

AUTHORS = "lora-convert"
FIXED_TIMESTAMP = "1980-01-01T00:00:00+00:00"  # the .task entries' fixed date
HASH_BLOCK = 16 << 20
# The generated reader calls VDataCreator but defines VdataCreator (litert-lm-builder 0.7):
# without the alias its object API cannot read a header back.
if not hasattr(schema, "VDataCreator"):
    schema.VDataCreator = schema.VdataCreator


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


def write_litertlm(config: BundleConfig, start_id: int, stop_ids: list[int], path: Path, cpu: bool = False) -> None:
    """Build the container atomically (the builder reads the metadata from a file); `cpu`: the
    model is a CPU graph, not GPU weights."""
    with tempfile.TemporaryDirectory() as scratch, atomic_output(path) as handle:
        metadata_path = Path(scratch) / "llm_metadata.pb"
        metadata_path.write_bytes(llm_metadata(config, start_id, stop_ids).SerializeToString())
        file = builder.LitertLmFileBuilder()
        file.add_system_metadata(builder.Metadata(key="Authors", value=AUTHORS, dtype=builder.DType.STRING))
        model_type = builder.TfLiteModelType.PREFILL_DECODE if cpu else builder.TfLiteModelType.ARTISAN_TEXT_DECODER
        file.add_tflite_model(str(config.tflite_model), model_type)
        file.add_sentencepiece_tokenizer(str(config.tokenizer_model))
        file.add_llm_metadata(str(metadata_path))
        file.build(handle)
        pin_system_metadata(handle)


def pin_system_metadata(handle: BinaryIO) -> None:
    """Replace the header's random uuid and creation time (see the module docstring) in the
    container just written to `handle`; the sections do not move."""
    header, header_end = read_header(handle)
    start = litertlm_core.HEADER_BEGIN_BYTE_OFFSET
    first_section = min(section.beginOffset for section in header.sectionMetadata.objects)
    digest = hashlib.sha256()
    handle.seek(first_section)
    while block := handle.read(HASH_BLOCK):
        digest.update(block)
    values = {b"uuid": str(uuid.UUID(bytes=digest.digest()[:16], version=5)), b"creation_timestamp": FIXED_TIMESTAMP}
    for entry in header.systemMetadata.entries:
        if entry.key in values:
            entry.value = schema.StringValueT(values[entry.key])
            entry.valueType = schema.VData.StringValue
    packer = flatbuffers.Builder(litertlm_core.BLOCK_SIZE)
    packer.Finish(header.Pack(packer))
    packed = bytes(packer.Output())
    if start + len(packed) > first_section:
        raise ConversionError("litert-lm-builder wrote a header with no room to pin its uuid and timestamp")
    handle.seek(litertlm_core.HEADER_END_LOCATION_BYTE_OFFSET)
    handle.write((start + len(packed)).to_bytes(8, "little"))
    handle.write(packed.ljust(max(header_end - start, len(packed)), b"\0"))


def read_header(handle: BinaryIO) -> tuple[schema.LiteRTLMMetaDataT, int]:
    """A .litertlm container's header (its sections' types, places and metadata) and where it ends."""
    handle.seek(litertlm_core.HEADER_END_LOCATION_BYTE_OFFSET)
    header_end = int.from_bytes(handle.read(8), "little")
    start = litertlm_core.HEADER_BEGIN_BYTE_OFFSET
    handle.seek(start)
    return schema.LiteRTLMMetaDataT.InitFromPackedBuf(handle.read(header_end - start), 0), header_end


def _sections(path: Path) -> list:
    try:
        with open(path, "rb") as handle:
            header = read_header(handle)[0]
        return header.sectionMetadata.objects or []
    except Exception:  # flatbuffers raises whatever a malformed header leads it to
        raise ConversionError(f"{path}: not a readable .litertlm container (its header is malformed)") from None


def model_types(path: Path) -> list[str]:
    """The `model_type` of each TFLiteModel section of a .litertlm (`tf_lite_artisan_text_decoder`:
    GPU weights for LiteRT-LM's GPU executor; `tf_lite_prefill_decode`: prefill/decode graphs)."""
    return [item.value.value.decode("utf-8", "replace") for section in _sections(path)
            if section.dataType == schema.AnySectionDataType.TFLiteModel
            for item in section.items or [] if item.key == b"model_type"]


def sentencepiece_model(path: Path) -> bytes | None:
    """The SentencePiece tokenizer section of a .litertlm (None when it has another kind of tokenizer)."""
    sections = [s for s in _sections(path) if s.dataType == schema.AnySectionDataType.SP_Tokenizer]
    if not sections:
        return None
    with open(path, "rb") as handle:
        handle.seek(sections[0].beginOffset)
        return handle.read(sections[0].endOffset - sections[0].beginOffset)


def model_section(path: Path) -> tuple[str, int, int]:
    """(model_type, begin, end) of a .litertlm's TFLite model section (`tf_lite_prefill_decode` for
    a CPU graph, `tf_lite_artisan_text_decoder` for GPU weights)."""
    for section in _sections(path):
        for item in section.items or []:
            if section.dataType == schema.AnySectionDataType.TFLiteModel and item.key == b"model_type":
                return item.value.value.decode("utf-8", "replace"), section.beginOffset, section.endOffset
    raise ConversionError(f"{path}: its .litertlm has no TFLite model section")
