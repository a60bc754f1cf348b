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

import os
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
LOCAL_SIGNATURE = b"PK\x03\x04"
LITERTLM_MAGIC = b"LITERTLM"
MAX_READ = 256 << 20  # entries read whole (tokenizer, METADATA); Gemma 3's tokenizer is 4.7 MB
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


def _entries(path: Path, archive: zipfile.ZipFile, handle, file_size: int) -> dict[str, Entry]:
    """Each entry's data range, checked against its local header and the file: stored, not
    encrypted, unique, inside the file and not overlapping another (a crafted zip is refused)."""
    entries: dict[str, Entry] = {}
    extents = []  # (local header offset, data end, name)
    for info in archive.infolist():
        where = f"{path}: entry {info.filename!r}"
        if info.compress_type != zipfile.ZIP_STORED:
            raise ConversionError(f"{where} is compressed; runtimes need stored entries")
        if info.flag_bits & 1:
            raise ConversionError(f"{where} is encrypted")
        if info.filename in entries:
            raise ConversionError(f"{where} appears twice")
        handle.seek(info.header_offset)
        header = handle.read(LOCAL_HEADER.size)
        if len(header) < LOCAL_HEADER.size or header[:4] != LOCAL_SIGNATURE:
            raise ConversionError(f"{where}: no local header at offset {info.header_offset}")
        fields = LOCAL_HEADER.unpack(header)
        name_length, extra_length = fields[-2], fields[-1]
        if handle.read(name_length) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
            raise ConversionError(f"{where}: the local header names another entry")
        offset = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
        if info.compress_size != info.file_size:
            raise ConversionError(f"{where}: stored, yet its sizes differ ({info.compress_size:,} and "
                                  f"{info.file_size:,} bytes)")
        if offset + info.file_size > file_size:
            raise ConversionError(f"{where}: {info.file_size:,} bytes at offset {offset:,} run past the end of the "
                                  f"{file_size:,}-byte file")
        entries[info.filename] = Entry(info.filename, offset, info.file_size)
        extents.append((info.header_offset, offset + info.file_size, info.filename))
    extents.sort()
    for (_, end, first), (start, _, second) in zip(extents, extents[1:]):
        if start < end:
            raise ConversionError(f"{path}: entries {first!r} and {second!r} overlap")
    return entries


class TaskFile:
    """Reads a .task bundle: its entries (with data offsets) and METADATA."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                file_size = os.fstat(handle.fileno()).st_size
                with zipfile.ZipFile(handle) as archive:
                    self.entries = _entries(self.path, archive, handle, file_size)
        except (zipfile.BadZipFile, OSError, struct.error, ValueError, EOFError, NotImplementedError) as exc:
            raise ConversionError(f"{self.path}: not a readable .task bundle ({exc})") from None
        missing = [n for n in (MODEL_ENTRY, TOKENIZER_ENTRY, METADATA_ENTRY) if n not in self.entries]
        if missing:
            raise ConversionError(f"{self.path}: bundle lacks entr{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}")

    def read(self, name: str) -> bytes:
        """A small entry's bytes (at most MAX_READ: the model entry is never read whole)."""
        entry = self.entries[name]
        if entry.size > MAX_READ:
            raise ConversionError(f"{self.path}: entry {name} holds {entry.size:,} bytes, more than the "
                                  f"{MAX_READ >> 20} MiB read for it")
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            data = handle.read(entry.size)
        if len(data) != entry.size:
            raise ConversionError(f"{self.path}: entry {name} ends early (the file shrank while being read)")
        return data

    def metadata(self) -> llm_params_pb2.LlmParameters:
        data = self.read(METADATA_ENTRY)
        try:
            return llm_params_pb2.LlmParameters.FromString(data)
        except Exception:  # protobuf's DecodeError and friends
            raise ConversionError(f"{self.path}: entry {METADATA_ENTRY} is not a valid LlmParameters message") from None


def file_kind(path: Path) -> str:
    """"task" for a .task zip (MediaPipe's starts with 4 pad bytes, then PK), "litertlm" for a
    LiteRT-LM container, else "weights" (left to the weights reader's own checks)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[4:6] == b"PK" or head[:2] == b"PK":
        return "task"
    return "litertlm" if head == LITERTLM_MAGIC else "weights"


def open_weights(path: Path, option: str | None = None) -> tuple[WeightFile, TaskFile | None]:
    """The weights of a .bin, or of a .task's model entry (with the bundle itself)."""
    regular_file(path, option)
    kind = file_kind(path)
    if kind == "litertlm":
        raise ConversionError(f"{path} is a .litertlm bundle; this takes a .task bundle or a GPU weights .bin")
    if kind == "weights":
        return WeightFile(path), None
    task = TaskFile(path)
    entry = task.entries[MODEL_ENTRY]
    try:
        return WeightFile(path, entry.offset, entry.size), task
    except ConversionError as exc:
        raise ConversionError(f"{exc} (in its entry {MODEL_ENTRY})") from None
