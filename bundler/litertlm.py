""".litertlm: the GPU weights or the CPU graph, tokenizer and start/stop tokens for LiteRT-LM.

Written with Google's `litert-lm-builder`. LiteRT-LM runs a MediaPipe GPU weights file when it
is a TFLiteModel section of type `tf_lite_artisan_text_decoder` (its "GPU artisan" executor), and
a CPU graph (`lora-convert --backend cpu`: prefill/decode signatures) when it is one of type
`tf_lite_prefill_decode` (its CPU executor, XNNPACK), next to a tokenizer section and an
LlmMetadata section with the token ids and prompt template. The tokenizer section is a
SentencePiece model, or a Hugging Face tokenizer.json (Llama 3, Qwen 2.5): section type
`HF_Tokenizer_Zlib`, the file's length as 8 little-endian bytes then its zlib stream.

The builder stamps a random `uuid` and the wall-clock `creation_timestamp` into the header's
system metadata and offers no way to set them. We rewrite the header (parsed and packed with the
builder's own flatbuffers schema) with a uuid derived from the sections' bytes and a fixed
timestamp, so the same inputs give the same file, byte for byte.
"""
from __future__ import annotations

import hashlib
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import BinaryIO

import flatbuffers
from google.protobuf.message import DecodeError
import litert_lm_builder as builder
from litert_lm_builder import litertlm_core
from litert_lm_builder import litertlm_header_schema_py_generated as schema
from litert_lm_builder.runtime.proto import llm_metadata_pb2

from converter.errors import ConversionError
from converter.files import MAX_JSON_BYTES, atomic_output

from .config import BundleConfig

AUTHORS = "lora-convert"
FIXED_TIMESTAMP = "1980-01-01T00:00:00+00:00"  # the .task entries' fixed date
HASH_BLOCK = 16 << 20
MAX_SECTION_READ = 256 << 20  # sections read whole (tokenizer, metadata): a few MB in real bundles
# The generated reader calls VDataCreator but defines VdataCreator (litert-lm-builder 0.7):
# without the alias its object API cannot read a header back.
if not hasattr(schema, "VDataCreator"):
    schema.VDataCreator = schema.VdataCreator


def llm_metadata(config: BundleConfig, start_id: int | None, stop_ids: list[int]) -> llm_metadata_pb2.LlmMetadata:
    """Start (None: none; LiteRT-LM then puts nothing before the prompt) and stop token ids, prompt template."""
    metadata = llm_metadata_pb2.LlmMetadata()
    if start_id is not None:
        metadata.start_token.token_ids.ids.append(start_id)
    for stop_id in stop_ids:
        metadata.stop_tokens.add().token_ids.ids.append(stop_id)
    if config.prompt_prefix or config.prompt_suffix:
        metadata.prompt_templates.user.prefix = config.prompt_prefix or ""
        metadata.prompt_templates.user.suffix = config.prompt_suffix or ""
    if config.system_prompt:
        metadata.prompt_templates.system.prefix = config.system_prompt
    return metadata


def write_litertlm(config: BundleConfig, start_id: int | None, stop_ids: list[int], path: Path, cpu: bool = False,
                   hf_tokenizer: bytes | None = None) -> None:
    """Build the container atomically (the builder reads the metadata from a file); `cpu`: the
    model is a CPU graph, not GPU weights; `hf_tokenizer`: the tokenizer.json bytes checked by
    the caller (an HF tokenizer section, zlib-compressed by the builder), else the SentencePiece
    --tokenizer-model."""
    with tempfile.TemporaryDirectory() as scratch, atomic_output(path) as handle:
        metadata_path = Path(scratch) / "llm_metadata.pb"
        metadata_path.write_bytes(llm_metadata(config, start_id, stop_ids).SerializeToString())
        file = builder.LitertLmFileBuilder()
        file.add_system_metadata(builder.Metadata(key="Authors", value=AUTHORS, dtype=builder.DType.STRING))
        model_type = builder.TfLiteModelType.PREFILL_DECODE if cpu else builder.TfLiteModelType.ARTISAN_TEXT_DECODER
        file.add_tflite_model(str(config.tflite_model), model_type)
        if hf_tokenizer is not None:  # the bytes that were checked, under the name the builder wants
            tokenizer_path = Path(scratch) / "tokenizer.json"
            tokenizer_path.write_bytes(hf_tokenizer)
            file.add_hf_tokenizer(str(tokenizer_path))
        else:
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


def check_complete(path: Path, option: str) -> None:
    """Every section of a .litertlm lies within the file (a cut-off download or copy aborts LiteRT-LM)."""
    size = path.stat().st_size
    end = max((section.endOffset for section in _sections(path)), default=0)
    if end > size:
        raise ConversionError(f"{option} {path}: truncated: its sections end at byte {end:,}, the file has {size:,}")


def model_types(path: Path) -> list[str]:
    """The `model_type` of each TFLiteModel section of a .litertlm (`tf_lite_artisan_text_decoder`:
    GPU weights for LiteRT-LM's GPU executor; `tf_lite_prefill_decode`: prefill/decode graphs)."""
    return [item.value.value.decode("utf-8", "replace") for section in _sections(path)
            if section.dataType == schema.AnySectionDataType.TFLiteModel
            for item in section.items or [] if item.key == b"model_type"]


def _section_bytes(path: Path, data_type: int, limit: int = MAX_SECTION_READ) -> bytes | None:
    """The first section of this type in a .litertlm (None when there is none), at most `limit` bytes."""
    sections = [s for s in _sections(path) if s.dataType == data_type]
    if not sections:
        return None
    size = sections[0].endOffset - sections[0].beginOffset
    if not 0 <= size <= limit:
        raise ConversionError(f"{path}: a .litertlm section of {size:,} bytes; expected at most {limit:,}")
    with open(path, "rb") as handle:
        handle.seek(sections[0].beginOffset)
        return handle.read(size)


def hf_tokenizer_json(path: Path) -> bytes | None:
    """The tokenizer.json of a .litertlm's Hugging Face tokenizer section (None when it has none):
    8 little-endian bytes of length, then the zlib stream, inflated to at most that length."""
    data = _section_bytes(path, schema.AnySectionDataType.HF_Tokenizer_Zlib)
    if data is None:
        return None
    size = int.from_bytes(data[:8], "little")
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(data[8:], min(size, MAX_JSON_BYTES) + 1)
    except zlib.error:
        text = b""
    if len(data) < 8 or len(text) != size or not inflate.eof:
        raise ConversionError(f"{path}: its Hugging Face tokenizer section is not a zlib stream of the "
                              f"{size:,} bytes it declares (at most {MAX_JSON_BYTES >> 20} MiB)")
    return text


def sentencepiece_model(path: Path) -> bytes | None:
    """The SentencePiece tokenizer section of a .litertlm (None when it has another kind of tokenizer)."""
    return _section_bytes(path, schema.AnySectionDataType.SP_Tokenizer)


def read_llm_metadata(path: Path) -> llm_metadata_pb2.LlmMetadata:
    """The LlmMetadata section of a .litertlm (tokens, prompt templates); empty when it has none."""
    data = _section_bytes(path, schema.AnySectionDataType.LlmMetadataProto) or b""
    try:
        return llm_metadata_pb2.LlmMetadata.FromString(data)
    except DecodeError:
        raise ConversionError(f"{path}: its LlmMetadata section is not a valid LlmMetadata protobuf") from None


def model_section(path: Path) -> tuple[str, int, int]:
    """(model_type, begin, end) of a .litertlm's TFLite model section (`tf_lite_prefill_decode` for
    a CPU graph, `tf_lite_artisan_text_decoder` for GPU weights)."""
    for section in _sections(path):
        for item in section.items or []:
            if section.dataType == schema.AnySectionDataType.TFLiteModel and item.key == b"model_type":
                return item.value.value.decode("utf-8", "replace"), section.beginOffset, section.endOffset
    raise ConversionError(f"{path}: its .litertlm has no TFLite model section")
