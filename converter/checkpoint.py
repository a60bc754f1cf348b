"""Lazy, memory-mapped tensor sources: safetensors (single, sharded, folders) and PyTorch files.

A source lists tensor names and shapes without reading data, and hands out row ranges of a
tensor as torch tensors in the stored dtype. Pages that were read are released right after
the caller is done with a chunk (`madvise(MADV_DONTNEED)`), so resident memory stays at one
chunk however big the checkpoint is.
"""
from __future__ import annotations

import ctypes
import glob
import json
import math
import mmap
import re
import struct
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import torch
from safetensors import safe_open

from .errors import ConversionError
from .files import read_json_object

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
FLOAT_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")  # training frameworks' wrappers
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's limit, in bytes
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def release_pages(address: int, nbytes: int) -> None:
    """Drop the resident pages of a read-only file mapping in [address, address + nbytes)."""
    start = address // PAGE * PAGE
    end = -(-(address + nbytes) // PAGE) * PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class TensorSource:
    """Named tensors of a checkpoint, readable in row ranges."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos

    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    @contextmanager
    def rows(self, name: str, start: int, stop: int) -> Iterator[torch.Tensor]:
        """Rows [start, stop) of a tensor (a 1-D tensor is one row), valid inside the block."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""


class SafetensorsSource(TensorSource):
    """One or more safetensors files, each memory-mapped; data read straight from the map."""

    def __init__(self, files: list[Path]):
        infos: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._offsets: dict[str, int] = {}
        self._sizes: dict[Path, int] = {}  # as validated with the header
        self._mapping = threading.Lock()  # chunks are read from several threads
        for file in files:
            entries, data_start = _read_safetensors_header(file)
            self._sizes[file] = file.stat().st_size
            for name, (shape, dtype, begin) in entries.items():
                if name in infos:
                    raise ConversionError(f"{file}: tensor {name} also appears in {infos[name].file}")
                infos[name] = TensorInfo(name, shape, dtype, file)
                self._offsets[name] = data_start + begin
        super().__init__(infos)

    def _map(self, file: Path) -> mmap.mmap:
        with self._mapping:
            if file not in self._maps:
                with open(file, "rb") as handle:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                size = len(mapped)
                if size != self._sizes[file]:
                    mapped.close()
                    raise ConversionError(f"{file} changed while being read ({self._sizes[file]:,} bytes when its "
                                          f"header was checked, {size:,} now); convert from a file nothing else writes")
                self._maps[file] = mapped
            return self._maps[file]

    @contextmanager
    def rows(self, name: str, start: int, stop: int) -> Iterator[torch.Tensor]:
        info = self.infos[name]
        row_elems = torch.Size(info.shape[1:]).numel() if len(info.shape) > 1 else info.shape[0]
        if len(info.shape) <= 1:
            start, stop = 0, 1
        count = (stop - start) * row_elems
        offset = self._offsets[name] + start * row_elems * info.dtype.itemsize
        buffer = self._map(info.file)
        chunk = torch.frombuffer(buffer, dtype=info.dtype, count=count, offset=offset)
        try:
            yield chunk.reshape(stop - start, *info.shape[1:]) if len(info.shape) > 1 else chunk
        finally:
            release_pages(chunk.data_ptr(), count * info.dtype.itemsize)

    def close(self) -> None:
        for buffer in self._maps.values():
            buffer.close()
        self._maps.clear()


def _read_safetensors_header(file: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype, int]], int]:
    """Each tensor's (shape, dtype, data offset) and where the data starts, checked by the rules the
    `safetensors` library applies (then by the library itself): a header of at most 100 MB that
    is a JSON object of tensor entries (and a `__metadata__` object of strings), unsigned sizes,
    `data_offsets` that tile the data from 0 to the end of the file without gaps or overlaps, each
    holding exactly its shape's bytes. Only the header is read."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{file}: not a safetensors file (shorter than its 8-byte header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > SAFETENSORS_MAX_HEADER or 8 + length > size:
                raise ConversionError(f"{file}: not a safetensors file (header length {length} is invalid: "
                                      f"the file has {size} bytes, headers are at most 100 MB)")
            text = handle.read(length).decode("utf-8")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConversionError(f"{file}: corrupt safetensors header ({str(exc) or type(exc).__name__})") from None
    except OSError as exc:
        raise ConversionError(f"{file}: cannot read ({exc.strerror})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ConversionError(f"{file}: corrupt safetensors header (__metadata__ is not an object of strings)")
    entries = {name: _tensor_entry(file, name, entry) for name, entry in header.items()}
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != position:
            problem = ("overlaps the tensor before it" if begin < position
                       else f"leaves {begin - position} bytes unused before it")
            raise ConversionError(f"{file}: tensor {name} has data_offsets [{begin}, {end}] that {problem} "
                                  f"(tensors must tile the data from offset 0)")
        position = end
    data_start = 8 + length
    if data_start + position != size:
        problem = (f"is truncated (its tensors need {position} bytes of data, it has {size - data_start})"
                   if data_start + position > size
                   else f"has {size - data_start - position} bytes after its last tensor")
        raise ConversionError(f"{file}: safetensors file {problem}")
    _check_with_library(file)
    return {name: (shape, dtype, begin) for name, (shape, dtype, begin, _) in entries.items()}, data_start


def _tensor_entry(file: Path, name: str, entry: object) -> tuple[tuple[int, ...], torch.dtype, int, int]:
    """A header entry's shape, dtype and data offsets, after checking their types and sizes."""
    def unsigned(value: object) -> bool:
        return type(value) is int and 0 <= value < 2**64

    _check_name(file, name)
    if not isinstance(entry, dict):
        raise ConversionError(f"{file}: corrupt safetensors header (tensor {name} is not an object)")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(unsigned(d) for d in shape):
        raise ConversionError(f"{file}: corrupt safetensors header (tensor {name} has shape {shape!r}; "
                              f"expected a list of unsigned integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(unsigned(o) for o in offsets):
        raise ConversionError(f"{file}: corrupt safetensors header (tensor {name} has data_offsets {offsets!r}; "
                              f"expected [begin, end], unsigned integers)")
    stored = entry.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(stored) if isinstance(stored, str) else None
    if dtype is None:
        raise ConversionError(f"{file}: tensor {name} has dtype {stored}; expected BF16, F16 or F32")
    begin, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != needed:
        raise ConversionError(f"{file}: tensor {name} has data_offsets [{begin}, {end}], but its shape {shape} "
                              f"of {stored} needs {needed} bytes")
    return tuple(shape), dtype, begin, end


def _check_name(file: Path, name: str) -> None:
    """Tensor names end up in messages, which are one line: no newlines or other control characters."""
    if not name.isprintable():
        raise ConversionError(f"{file}: tensor name {name!r} holds control characters")


def _check_with_library(file: Path) -> None:
    """The `safetensors` library's own header validation (it maps the file, reading only the header)."""
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as exc:  # SafetensorError, or an OSError from mapping
        raise ConversionError(f"{file}: not a valid safetensors file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PytorchSource(TensorSource):
    """A PyTorch `.bin`/`.pt` state dict, loaded with `weights_only=True` and `mmap=True`."""

    def __init__(self, files: list[Path]):
        infos: dict[str, TensorInfo] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            for name, tensor in _load_pytorch(file).items():
                if name in infos:
                    raise ConversionError(f"{file}: tensor {name} also appears in {infos[name].file}")
                if tensor.dtype not in FLOAT_DTYPES or tensor.layout != torch.strided:
                    raise ConversionError(f"{file}: tensor {name} is a {tensor.dtype} tensor ({tensor.layout}); "
                                          f"expected dense bfloat16, float16 or float32")
                infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)
                self._tensors[name] = tensor
        super().__init__(infos)

    @contextmanager
    def rows(self, name: str, start: int, stop: int) -> Iterator[torch.Tensor]:
        tensor = self._tensors[name]
        chunk = tensor[start:stop] if tensor.dim() > 1 else tensor
        try:
            yield chunk
        finally:
            if chunk.is_contiguous():
                release_pages(chunk.data_ptr(), chunk.numel() * chunk.element_size())

    def close(self) -> None:
        self._tensors.clear()


def _load_pytorch(file: Path) -> dict[str, torch.Tensor]:
    """A file's state dict: tensors by name, also when saved under one of NESTED_STATE_KEYS."""
    try:
        if not zipfile.is_zipfile(file):
            raise ConversionError(
                f"{file}: not a PyTorch zip checkpoint (legacy or corrupt files cannot be loaded safely)"
            )
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except ConversionError:
        raise
    except Exception as exc:  # torch raises many types for corrupt/unsafe files
        raise ConversionError(f"{file}: cannot load PyTorch checkpoint safely ({_first_line(exc)})") from None
    if isinstance(state, dict):
        nested = next((state[key] for key in NESTED_STATE_KEYS if isinstance(state.get(key), dict)), None)
        state = state if nested is None else nested
    if not isinstance(state, dict):
        raise ConversionError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor; expected a "
                                  f"state dict of tensors (or one under {', '.join(NESTED_STATE_KEYS)})")
        _check_name(file, name)
    return state


SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# What Trainer/Accelerate save beside the weights in a checkpoint folder: never weights.
TRAINING_STATE = re.compile(r"^(training_args\.bin|(optimizer|scheduler|sampler)(_\d+)?\.(pt|bin)|scaler\.pt"
                            r"|rng_state(_\d+)?\.pth)$")
LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B)(\.|$)")


SUFFIXES = {"safetensors": (".safetensors",), "pytorch": (".bin", ".pt", ".pth")}


def checkpoint_files(path: str | Path, ckpt_format: str) -> list[Path]:
    """The files of a checkpoint given as a file, a folder (index or all weight files) or a glob."""
    suffixes = SUFFIXES[ckpt_format]
    index_name = SAFETENSORS_INDEX if ckpt_format == "safetensors" else PYTORCH_INDEX
    path = Path(path)
    if path.is_dir():
        index = path / index_name
        if index.is_file():
            return _files_from_index(index, suffixes)
        return _folder_files(path, suffixes)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _files_from_index(path, suffixes)
        if path.suffix not in suffixes:
            raise ConversionError(f"{path}: expected a {ckpt_format} file ({', '.join(suffixes)})")
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path)))
    if matches and all(p.is_file() for p in matches):
        return matches
    raise ConversionError(f"{path}: checkpoint not found")


def _folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """A folder's weight files: every file with the format's suffix but adapter files and training state."""
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes and p.is_file())
    weights = [p for p in files if "adapter" not in p.name and not TRAINING_STATE.match(p.name)]
    if weights:
        return weights
    if (folder / "adapter_config.json").is_file() or any("adapter" in p.name for p in files):
        raise ConversionError(f"{folder}: this is a LoRA adapter folder, not a base checkpoint; pass it as "
                              f"--lora-ckpt and the base model as --input-ckpt")
    skipped = f" (only training state: {', '.join(p.name for p in files)})" if files else ""
    raise ConversionError(f"{folder}: no {' or '.join(suffixes)} files in this folder{skipped}")


def _files_from_index(index: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The shard files an index's `weight_map` lists (tensor name -> file name in the index's folder)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: not a valid checkpoint index (weight_map must be a non-empty object "
                              f"of tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_relative(shard) or Path(shard).suffix not in suffixes:
            raise ConversionError(f"{index}: tensor {name} maps to {shard!r}; expected a {' or '.join(suffixes)} "
                                  f"file inside {index.parent}")
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{index}: shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def _plain_relative(name: str) -> bool:
    """A path that stays inside the folder it is relative to: not absolute, no `..`, no NUL."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\0" not in name


def open_checkpoint(path: str | Path, ckpt_format: str) -> TensorSource:
    """Open a base checkpoint as a lazy tensor source; a LoRA adapter given as one is refused."""
    files = checkpoint_files(path, ckpt_format)
    source = SafetensorsSource(files) if ckpt_format == "safetensors" else PytorchSource(files)
    lora = next((name for name in source.names() if LORA_KEY.search(name)), None)
    if lora is not None:
        source.close()
        raise ConversionError(f"{source.info(lora).file}: this is a LoRA adapter (tensor {lora}), not a base "
                              f"checkpoint; pass it as --lora-ckpt and the base model as --input-ckpt")
    return source


def open_tensor_file(path: Path) -> TensorSource:
    """Open one tensor file, choosing the reader from its extension."""
    return SafetensorsSource([path]) if path.suffix == ".safetensors" else PytorchSource([path])
