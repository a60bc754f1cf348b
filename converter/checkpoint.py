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
import mmap
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import ConversionError
from .files import read_json_object

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
FLOAT_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
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
        for file in files:
            header, data_start, size = _read_safetensors_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if name in infos:
                    raise ConversionError(f"{file}: tensor {name} also appears in {infos[name].file}")
                dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise ConversionError(
                        f"{file}: tensor {name} has dtype {entry.get('dtype')}; expected BF16, F16 or F32"
                    )
                shape = tuple(entry["shape"])
                begin, end = entry["data_offsets"]
                expected = torch.Size(shape).numel() * dtype.itemsize
                if end - begin != expected or data_start + end > size:
                    raise ConversionError(
                        f"{file}: tensor {name} data is truncated or inconsistent "
                        f"(needs {expected} bytes at offset {data_start + begin}, file has {size})"
                    )
                infos[name] = TensorInfo(name, shape, dtype, file)
                self._offsets[name] = data_start + begin
        super().__init__(infos)

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as handle:
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
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


def _read_safetensors_header(file: Path) -> tuple[dict, int, int]:
    """Parse the documented safetensors header: u64 little-endian length, then JSON."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{file}: not a safetensors file (shorter than its 8-byte header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, 100 * 2**20):
                raise ConversionError(f"{file}: not a safetensors file (header length {length} is invalid)")
            header = json.loads(handle.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{file}: corrupt safetensors header ({exc})") from None
    except OSError as exc:
        raise ConversionError(f"{file}: cannot read ({exc.strerror})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: corrupt safetensors header (not a JSON object)")
    return header, 8 + length, size


class PytorchSource(TensorSource):
    """A PyTorch `.bin`/`.pt` state dict, loaded with `weights_only=True` and `mmap=True`."""

    def __init__(self, files: list[Path]):
        infos: dict[str, TensorInfo] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            state = _load_pytorch(file)
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    continue
                if name in infos:
                    raise ConversionError(f"{file}: tensor {name} also appears in {infos[name].file}")
                if tensor.dtype not in FLOAT_DTYPES:
                    raise ConversionError(
                        f"{file}: tensor {name} has dtype {tensor.dtype}; expected bfloat16, float16 or float32"
                    )
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


def _load_pytorch(file: Path) -> dict:
    if not zipfile.is_zipfile(file):
        raise ConversionError(
            f"{file}: not a PyTorch zip checkpoint (legacy or corrupt files cannot be loaded safely)"
        )
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/unsafe files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{file}: cannot load PyTorch checkpoint safely ({first_line})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{file}: expected a state dict of tensors, found {type(state).__name__}")
    return state


SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"


def checkpoint_files(path: str | Path, ckpt_format: str) -> list[Path]:
    """The files of a checkpoint given as a file, a folder (index or all shards) or a glob."""
    suffixes = (".safetensors",) if ckpt_format == "safetensors" else (".bin", ".pt", ".pth")
    index_name = SAFETENSORS_INDEX if ckpt_format == "safetensors" else PYTORCH_INDEX
    path = Path(path)
    if path.is_dir():
        index = path / index_name
        if index.is_file():
            return _files_from_index(index)
        files = sorted(p for p in path.iterdir() if p.suffix in suffixes and p.is_file() and "adapter" not in p.name)
        if not files:
            raise ConversionError(f"{path}: no {' or '.join(suffixes)} files in this folder")
        return files
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _files_from_index(path)
        if path.suffix not in suffixes:
            raise ConversionError(f"{path}: expected a {ckpt_format} file ({', '.join(suffixes)})")
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path)))
    if matches and all(p.is_file() for p in matches):
        return matches
    raise ConversionError(f"{path}: checkpoint not found")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = read_json_object(index)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index}: not a valid checkpoint index ({exc})") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{index}: shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def open_checkpoint(path: str | Path, ckpt_format: str) -> TensorSource:
    """Open a base checkpoint or adapter as a lazy tensor source."""
    files = checkpoint_files(path, ckpt_format)
    return SafetensorsSource(files) if ckpt_format == "safetensors" else PytorchSource(files)


def open_tensor_file(path: Path) -> TensorSource:
    """Open one tensor file, choosing the reader from its extension."""
    return SafetensorsSource([path]) if path.suffix == ".safetensors" else PytorchSource([path])
