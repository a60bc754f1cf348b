"""Tensor sources: safetensors (single, sharded, folder, glob) and PyTorch files; their refusals."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.checkpoint import checkpoint_files, open_checkpoint
from converter.errors import ConversionError

from .conftest import TINY


def reference() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "model.safetensors"))


def shard(folder: Path, tensors: dict[str, torch.Tensor], parts: int = 2) -> None:
    names = sorted(tensors)
    weight_map = {}
    for index in range(parts):
        file = f"model-{index + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[index::parts]}
        save_file(chunk, str(folder / file))
        weight_map.update({n: file for n in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def read_all(source) -> dict[str, torch.Tensor]:
    result = {}
    for name in source.names():
        info = source.info(name)
        with source.rows(name, 0, info.shape[0]) as chunk:
            result[name] = chunk.clone()
    return result


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_single_file_folder_and_rows():
    source = open_checkpoint(TINY, "safetensors")
    assert_same(read_all(source), reference())
    name = "model.layers.0.mlp.down_proj.weight"
    with source.rows(name, 8, 12) as chunk:
        assert torch.equal(chunk, reference()[name][8:12])
    source.close()


def test_sharded_with_index_folder_and_glob(tmp_path):
    shard(tmp_path, reference())
    assert len(checkpoint_files(tmp_path, "safetensors")) == 2
    assert_same(read_all(open_checkpoint(tmp_path, "safetensors")), reference())
    assert_same(read_all(open_checkpoint(tmp_path / "model.safetensors.index.json", "safetensors")), reference())
    (tmp_path / "model.safetensors.index.json").unlink()
    assert_same(read_all(open_checkpoint(tmp_path / "model-*.safetensors", "safetensors")), reference())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pytorch_bin_in_each_float_dtype(tmp_path, dtype):
    tensors = {k: v.to(dtype) for k, v in reference().items()}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert_same(read_all(open_checkpoint(tmp_path, "pytorch")), tensors)


def test_refuses_unsupported_dtype(tmp_path):
    save_file({"model.norm.weight": torch.zeros(4, dtype=torch.int8)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ConversionError, match="model.norm.weight has dtype I8"):
        open_checkpoint(tmp_path / "m.safetensors", "safetensors")


def test_refuses_corrupt_and_truncated_safetensors(tmp_path):
    good = (TINY / "model.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        open_checkpoint(tmp_path / "truncated.safetensors", "safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json........")
    with pytest.raises(ConversionError, match="corrupt safetensors header"):
        open_checkpoint(tmp_path / "garbage.safetensors", "safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    with pytest.raises(ConversionError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "tiny.safetensors", "safetensors")


def test_refuses_missing_shard_and_duplicates(tmp_path):
    shard(tmp_path, reference())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="missing"):
        open_checkpoint(tmp_path, "safetensors")
    other = tmp_path / "dup"
    other.mkdir()
    save_file({"model.norm.weight": torch.zeros(4)}, str(other / "a.safetensors"))
    save_file({"model.norm.weight": torch.zeros(4)}, str(other / "b.safetensors"))
    with pytest.raises(ConversionError, match="also appears"):
        open_checkpoint(other, "safetensors")


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_refuses_unsafe_or_legacy_pytorch_files(tmp_path):
    (tmp_path / "legacy.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ConversionError, match="not a PyTorch zip checkpoint"):
        open_checkpoint(tmp_path / "legacy.bin", "pytorch")

    torch.save({"weights": Payload()}, tmp_path / "unsafe.bin")
    with pytest.raises(ConversionError, match="cannot load PyTorch checkpoint safely"):
        open_checkpoint(tmp_path / "unsafe.bin", "pytorch")


def test_missing_paths(tmp_path):
    with pytest.raises(ConversionError, match="checkpoint not found"):
        open_checkpoint(tmp_path / "nope", "safetensors")
    with pytest.raises(ConversionError, match="no .safetensors files"):
        open_checkpoint(tmp_path, "safetensors")
