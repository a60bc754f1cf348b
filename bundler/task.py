""".task bundles: the zip MediaPipe's LLM Inference runtimes load, written and read.

Layout (MediaPipe 0.10.21's bundler): entries TF_LITE_PREFILL_DECODE (the weights file),
TOKENIZER_MODEL (SentencePiece model) and METADATA (serialized LlmParameters holding start and
stop tokens, prompt template, bytes-to-unicode), in that order; stored, never compressed;
1-4 NUL bytes before every local header so each entry's data starts 4-byte aligned (the file
therefore begins `00 00 00 00 PK`, which is also how the web runtime recognizes a .task).
Unlike MediaPipe's, our entries carry a fixed timestamp, so a bundle is byte-for-byte
reproducible, and the model is streamed from disk instead of read into memory.
"""
from __future__ import annotations

import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from converter.errors import ConversionError
from converter.files import atomic_output, regular_file
from converter.proto import llm_params_pb2
from converter.tflite import WeightFile

MODEL_ENTRY = "TF_LITE_PREFILL_DECODE"
TOKENIZER_ENTRY = "TOKENIZER_MODEL"
METADATA_ENTRY = "METADATA"
ALIGNMENT = 4
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ENTRY_MODE = 0o600 << 16  # what zipfile.writestr gives a file entry
LOCAL_HEADER = struct.Struct("<4s5H3L2H")
COPY_BLOCK = 16 << 20


def bundle_metadata(start_token: str, stop_tokens: list[str], bytes_to_unicode: bool,
                    system_prompt: str | None, prompt_prefix: str | None,
                    prompt_suffix: str | None) -> bytes:
    """METADATA: LlmParameters with exactly the fields MediaPipe's bundler sets."""
    params = llm_params_pb2.LlmParameters(start_token=start_token, stop_tokens=stop_tokens)
    if bytes_to_unicode:
        params.input_output_normalizations.append(
            llm_params_pb2.LlmParameters.INPUT_OUTPUT_NORMALIZATION_BYTES_TO_UNICODE)
    template = params.prompt_template
    if system_prompt:
        template.session_prefix = system_prompt
    if prompt_prefix:
        template.prompt_prefix = prompt_prefix
    if prompt_suffix:
        template.prompt_suffix = prompt_suffix
    return params.SerializeToString()


class _AlignedZipFile(zipfile.ZipFile):
    """Stored entries whose data starts at a multiple of ALIGNMENT, padded the way MediaPipe pads."""

    def _writecheck(self, zinfo: zipfile.ZipInfo) -> None:
        if zinfo.compress_type != zipfile.ZIP_STORED:
            raise ValueError("bundle entries are stored uncompressed")
        header = LOCAL_HEADER.size + len(zinfo.filename.encode()) + len(zinfo.extra)
        padding = ALIGNMENT - (self.fp.tell() + header) % ALIGNMENT  # 1..ALIGNMENT, never 0
        self.fp.write(b"\0" * padding)
        zinfo.header_offset = self.fp.tell()
        super()._writecheck(zinfo)


def _entry(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = ENTRY_MODE
    info.file_size = size
    return info


def write_zip(path: Path, entries: list[tuple[str, Path | bytes]]) -> None:
    """Write an aligned, reproducible zip; file entries are streamed. Atomic: temp file + rename."""
    with atomic_output(path) as handle, _AlignedZipFile(handle, mode="w") as archive:
        for name, content in entries:
            if isinstance(content, bytes):
                with archive.open(_entry(name, len(content)), "w") as dest:
                    dest.write(content)
                continue
            with open(content, "rb") as source, archive.open(_entry(name, content.stat().st_size), "w") as dest:
                shutil.copyfileobj(source, dest, COPY_BLOCK)


@dataclass(frozen=True)
class Entry:
    name: str
    offset: int  # where the entry's data starts in the bundle
    size: int


class TaskFile:
    """Reads a .task bundle: its entries (with data offsets) and METADATA."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as archive, open(self.path, "rb") as handle:
                self.entries: dict[str, Entry] = {}
                for info in archive.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise ConversionError(f"{self.path}: entry {info.filename} is compressed; runtimes need stored entries")
                    handle.seek(info.header_offset)
                    fields = LOCAL_HEADER.unpack(handle.read(LOCAL_HEADER.size))
                    name_length, extra_length = fields[-2], fields[-1]
                    offset = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
                    self.entries[info.filename] = Entry(info.filename, offset, info.file_size)
        except (zipfile.BadZipFile, OSError, struct.error) as exc:
            raise ConversionError(f"{self.path}: not a readable .task bundle ({exc})") from None
        missing = [n for n in (MODEL_ENTRY, TOKENIZER_ENTRY, METADATA_ENTRY) if n not in self.entries]
        if missing:
            raise ConversionError(f"{self.path}: bundle lacks entr{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}")

    def read(self, name: str) -> bytes:
        entry = self.entries[name]
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            return handle.read(entry.size)

    def metadata(self) -> llm_params_pb2.LlmParameters:
        try:
            return llm_params_pb2.LlmParameters.FromString(self.read(METADATA_ENTRY))
        except Exception:  # protobuf's DecodeError and friends
            raise ConversionError(f"{self.path}: METADATA is not a valid LlmParameters message") from None


def is_task(path: Path) -> bool:
    """A .task zip (MediaPipe's starts with 4 pad bytes, then PK) rather than a weights file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return head[4:6] == b"PK" or head[:2] == b"PK"


def open_weights(path: Path, option: str | None = None) -> tuple[WeightFile, TaskFile | None]:
    """The weights of a .bin, or of a .task's model entry (with the bundle itself)."""
    regular_file(path, option)
    if not is_task(path):
        return WeightFile(path), None
    task = TaskFile(path)
    entry = task.entries[MODEL_ENTRY]
    return WeightFile(path, entry.offset, entry.size), task
