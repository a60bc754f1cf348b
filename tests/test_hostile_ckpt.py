"""Hostile checkpoints and weights files: safetensors headers, shard indexes, Trainer folders, PyTorch
files, adapters given as the base, tensors of 2 GiB or more, and corrupt TFLite flatbuffers.

Each bad input must end in one ConversionError naming the file (and the tensor where there is one);
through the CLI, one `error:` line, exit 1, no traceback, no output, the input unchanged. Headers are
crafted by hand (struct.pack + JSON) and checked against the `safetensors` library's own verdict.
"""
from __future__ import annotations

import json
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from converter import checkpoint, tflite
from converter.checkpoint import checkpoint_files, open_checkpoint
from converter.errors import ConversionError
from converter.models import find_model_type

from .conftest import TINY, TINY_LORA, TOKENIZER, base_args, padded_tokenizer, run_convert
from .test_tflite import METADATA, TENSORS, write


def safetensors_bytes(header: object, data: bytes = b"", raw: bytes | None = None, length: int | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(begin: int, end: int, shape=(2,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt"):
            return True
    except Exception:
        return False


def ours_accepts(path: Path) -> bool:
    try:
        open_checkpoint(path, "safetensors").close()
        return True
    except ConversionError:
        return False


# name: (file bytes, words the message must contain)
BAD_SAFETENSORS = {
    "empty file": (b"", ["8-byte header"]),
    "header length past the end": (safetensors_bytes({}, length=4096), ["header length 4096"]),
    "header length absurd": (safetensors_bytes({}, length=2**63), ["header length"]),
    "header over 100 MB": (struct.pack("<Q", 100_000_001), ["header length 100000001"]),  # made sparse below
    "header not JSON": (safetensors_bytes(None, raw=b"{not json}"), ["corrupt safetensors header"]),
    "header invalid UTF-8": (safetensors_bytes(None, raw=b'{"\xff":1}'), ["corrupt safetensors header"]),
    "header a list": (safetensors_bytes([1, 2]), ["not a JSON object"]),
    "header a string": (safetensors_bytes("x"), ["not a JSON object"]),
    "header null": (safetensors_bytes(None), ["not a JSON object"]),
    "deep nesting": (safetensors_bytes(None, raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                     ["corrupt safetensors header"]),
    "tensor entry null": (safetensors_bytes({"w": None}), ["tensor w", "not an object"]),
    "tensor entry a list": (safetensors_bytes({"w": [0, 8]}), ["tensor w", "not an object"]),
    "metadata a list": (safetensors_bytes({"__metadata__": ["a"]}), ["__metadata__"]),
    "metadata of numbers": (safetensors_bytes({"__metadata__": {"format": 1}}), ["__metadata__"]),
    "metadata NaN": (safetensors_bytes(None, raw=b'{"__metadata__":{"a":NaN}}'), ["__metadata__"]),
    "shape null": (safetensors_bytes({"w": {**entry(0, 8), "shape": None}}, bytes(8)), ["tensor w", "shape"]),
    "shape a string": (safetensors_bytes({"w": {**entry(0, 8), "shape": "2"}}, bytes(8)), ["tensor w", "shape"]),
    "shape float": (safetensors_bytes({"w": entry(0, 8, shape=(2.0,))}, bytes(8)), ["tensor w", "shape"]),
    "shape bool": (safetensors_bytes({"w": entry(0, 4, shape=(True,))}, bytes(4)), ["tensor w", "shape"]),
    "shape negative": (safetensors_bytes({"w": entry(0, 8, shape=(-2,))}, bytes(8)), ["tensor w", "shape"]),
    "shape absurd": (safetensors_bytes({"w": entry(0, 8, shape=(2**40, 2**40))}, bytes(8)), ["tensor w", "needs"]),
    "shape over u64": (safetensors_bytes({"w": entry(0, 8, shape=(2**64,))}, bytes(8)), ["tensor w", "shape"]),
    "offsets missing": (safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
                        ["tensor w", "data_offsets"]),
    "offsets an object": (safetensors_bytes({"w": {**entry(0, 8), "data_offsets": {"0": 8}}}, bytes(8)),
                          ["tensor w", "data_offsets"]),
    "three offsets": (safetensors_bytes({"w": {**entry(0, 8), "data_offsets": [0, 8, 8]}}, bytes(8)),
                      ["tensor w", "data_offsets"]),
    "negative offset": (safetensors_bytes({"w": entry(-8, 0)}, bytes(8)), ["tensor w", "data_offsets"]),
    "float offset": (safetensors_bytes({"w": entry(0, 8.0)}, bytes(8)), ["tensor w", "data_offsets"]),
    "dtype null": (safetensors_bytes({"w": entry(0, 8, dtype=None)}, bytes(8)), ["tensor w", "dtype None"]),
    "dtype unknown": (safetensors_bytes({"w": entry(0, 8, dtype="F33")}, bytes(8)), ["tensor w", "dtype F33"]),
    "dtype lowercase": (safetensors_bytes({"w": entry(0, 8, dtype="f32")}, bytes(8)), ["tensor w", "dtype f32"]),
    "offsets not matching dtype*shape": (safetensors_bytes({"w": entry(0, 12)}, bytes(12)),
                                         ["tensor w", "needs 8 bytes"]),
    "end before begin": (safetensors_bytes({"a": entry(0, 8), "w": entry(8, 0)}, bytes(8)), ["tensor w"]),
    "overlapping": (safetensors_bytes({"a": entry(0, 8), "w": entry(4, 12)}, bytes(12)), ["tensor w", "overlaps"]),
    "duplicate offsets": (safetensors_bytes({"a": entry(0, 8), "w": entry(0, 8)}, bytes(8)), ["tensor w", "overlaps"]),
    "gap": (safetensors_bytes({"a": entry(0, 8), "w": entry(12, 20)}, bytes(20)), ["tensor w", "4 bytes unused"]),
    "not starting at 0": (safetensors_bytes({"w": entry(4, 12)}, bytes(12)), ["tensor w", "4 bytes unused"]),
    "duplicate key keeping the later offsets": (
        safetensors_bytes(None, bytes(16), raw=b'{"w":' + json.dumps(entry(0, 8)).encode() + b',"w":'
                          + json.dumps(entry(8, 16)).encode() + b"}"), ["tensor w", "8 bytes unused"]),
    "offsets past the end": (safetensors_bytes({"w": entry(0, 8)}, bytes(4)), ["truncated", "need 8 bytes"]),
    "bytes after the last tensor": (safetensors_bytes({"w": entry(0, 8)}, bytes(9)), ["1 bytes after its last tensor"]),
    "NaN in an ignored field": (safetensors_bytes(None, bytes(8), raw=b'{"w":{"dtype":"F32","shape":[2],'
                                                  b'"data_offsets":[0,8],"x":NaN}}'), ["not a valid safetensors file"]),
}

GOOD_SAFETENSORS = {
    "no tensors": safetensors_bytes({}),
    "null metadata": safetensors_bytes({"__metadata__": None, "w": entry(0, 8)}, bytes(8)),
    "metadata of strings": safetensors_bytes({"__metadata__": {"format": "pt"}, "w": entry(0, 8)}, bytes(8)),
    "scalar and empty tensors": safetensors_bytes({"s": entry(0, 4, shape=()), "e": entry(4, 4, shape=(0, 3)),
                                                   "f": entry(4, 4, shape=(0,))}, bytes(4)),
    "entries in any order, extra fields, padding": safetensors_bytes(
        None, bytes(12), raw=b' {"b":{"data_offsets":[8,12],"shape":[2],"dtype":"BF16","note":1},'
                             b'"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}    '),
}


@pytest.mark.parametrize("case", BAD_SAFETENSORS)
def test_bad_safetensors_header_is_refused_like_the_library_does(case, tmp_path):
    data, words = BAD_SAFETENSORS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    if case == "header over 100 MB":
        with open(path, "r+b") as handle:
            handle.truncate(8 + 100_000_001)
    with pytest.raises(ConversionError) as error:
        open_checkpoint(path, "safetensors")
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for word in words:
        assert word in message, (word, message)
    assert not library_accepts(path), "the safetensors library accepts it: we must too"


@pytest.mark.parametrize("case", GOOD_SAFETENSORS)
def test_unusual_but_valid_safetensors_headers_are_read(case, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(GOOD_SAFETENSORS[case])
    assert library_accepts(path)
    source = open_checkpoint(path, "safetensors")
    with safe_open(path, framework="pt") as reference:
        assert sorted(source.names()) == sorted(reference.keys())
        for name in source.names():
            info = source.info(name)
            expected = reference.get_tensor(name)
            assert info.shape == tuple(expected.shape) and info.dtype == expected.dtype
    source.close()


def test_dtypes_the_library_takes_but_a_model_cannot_name_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"w": entry(0, 2, dtype="F8_E4M3")}, bytes(2)))
    assert library_accepts(path)
    with pytest.raises(ConversionError, match="tensor w has dtype F8_E4M3; expected BF16, F16 or F32"):
        open_checkpoint(path, "safetensors")


# Valid headers to start from: a few float tensors laid out back to back.
@st.composite
def headers(draw):
    count = draw(st.integers(0, 4))
    entries, position = {}, 0
    for index in range(count):
        dtype = draw(st.sampled_from(["F32", "F16", "BF16"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = int(np.prod(shape, dtype=np.int64)) * (4 if dtype == "F32" else 2)
        entries[f"t{index}"] = entry(position, position + size, shape, dtype)
        position += size
    return entries, position


# Damage done to one tensor's entry: every value type and range the header can hold.
values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64 + 1), st.floats(allow_nan=False, width=32),
                   st.text(max_size=3), st.lists(st.integers(-1, 40), max_size=3),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=headers(), field=st.sampled_from(["dtype", "shape", "data_offsets", "whole", "extra bytes", "offset"]),
       value=values, delta=st.integers(-9, 9))
def test_our_verdict_matches_the_library_on_damaged_headers(tmp_path, start, field, value, delta):
    entries, size = start
    extra = 0
    if entries:
        victim = entries[sorted(entries)[-1]]
        if field == "whole":
            entries[sorted(entries)[-1]] = value
        elif field == "offset":
            victim["data_offsets"] = [victim["data_offsets"][0], victim["data_offsets"][1] + delta]
        elif field != "extra bytes":
            victim[field] = value
    if field == "extra bytes":
        extra = delta
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(safetensors_bytes(entries, bytes(max(0, size + extra))))
    assert ours_accepts(path) == library_accepts(path), entries


def test_cli_refuses_a_hostile_checkpoint_in_one_line_and_leaves_it_unchanged(tiny, tmp_path):
    data = safetensors_bytes({"model.embed_tokens.weight": entry(0, 8), "model.norm.weight": entry(4, 12)}, bytes(12))
    (tiny / "model.safetensors").write_bytes(data)
    out = tmp_path / "out"
    result = run_convert(*base_args(tiny, out))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "model.safetensors" in lines[0] and "model.norm.weight" in lines[0] and "overlaps" in lines[0]
    assert "Traceback" not in result.output and not out.exists()
    assert (tiny / "model.safetensors").read_bytes() == data


# ---- shard indexes -------------------------------------------------------------------------------

def sharded(folder: Path) -> dict[str, str]:
    tensors = load_file(str(TINY / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2])):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    return weight_map


def write_index(folder: Path, content: object) -> None:
    (folder / checkpoint.SAFETENSORS_INDEX).write_text(json.dumps(content))


@pytest.mark.parametrize("case,mutate,words", [
    ("index a list", lambda m: [m], ["JSON object"]),
    ("no weight_map", lambda m: {"metadata": {}}, ["weight_map"]),
    ("weight_map a list", lambda m: {"weight_map": list(m.items())}, ["weight_map"]),
    ("weight_map empty", lambda m: {"weight_map": {}}, ["weight_map"]),
    ("shard name null", lambda m: {"weight_map": {**m, "model.norm.weight": None}}, ["model.norm.weight", "None"]),
    ("shard name a list", lambda m: {"weight_map": {**m, "model.norm.weight": ["a"]}}, ["model.norm.weight"]),
    ("shard outside the folder", lambda m: {"weight_map": {**m, "model.norm.weight": "../x.safetensors"}},
     ["model.norm.weight", "../x.safetensors", "inside"]),
    ("absolute shard path", lambda m: {"weight_map": {**m, "model.norm.weight": "/etc/x.safetensors"}},
     ["model.norm.weight", "/etc/x.safetensors"]),
    ("shard of another format", lambda m: {"weight_map": {**m, "model.norm.weight": "x.bin"}},
     ["model.norm.weight", "x.bin", ".safetensors"]),
    ("NUL in a shard name", lambda m: {"weight_map": {**m, "model.norm.weight": "a\0.safetensors"}},
     ["model.norm.weight"]),
    ("missing shard", lambda m: {"weight_map": {**m, "model.norm.weight": "model-00003-of-00003.safetensors"}},
     ["missing", "model-00003-of-00003.safetensors"]),
])
def test_bad_shard_index_is_one_line(case, mutate, words, tmp_path):
    write_index(tmp_path, mutate(sharded(tmp_path)))
    with pytest.raises(ConversionError) as error:
        open_checkpoint(tmp_path, "safetensors")
    message = str(error.value)
    assert message.startswith(str(tmp_path / checkpoint.SAFETENSORS_INDEX)) and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_index_with_a_subfolder_shard_and_the_tensor_in_two_shards(tmp_path):
    weight_map = sharded(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "model-00002-of-00002.safetensors").rename(tmp_path / "sub" / "b.safetensors")
    write_index(tmp_path, {"weight_map": {n: f if f.startswith("model-00001") else "sub/b.safetensors"
                                          for n, f in weight_map.items()}})
    open_checkpoint(tmp_path, "safetensors").close()  # a shard in a subfolder stays inside: fine
    name = next(n for n, f in weight_map.items() if f.startswith("model-00001"))
    save_file({name: torch.zeros(2)}, str(tmp_path / "sub" / "b.safetensors"))
    write_index(tmp_path, {"weight_map": {name: "model-00001-of-00002.safetensors", "x": "sub/b.safetensors"}})
    with pytest.raises(ConversionError, match=f"tensor {name} also appears in .*model-00001-of-00002"):
        open_checkpoint(tmp_path, "safetensors")


def test_duplicate_tensor_across_shards_without_an_index(tmp_path):
    sharded(tmp_path)
    save_file({"model.norm.weight": torch.zeros(64)}, str(tmp_path / "model-extra.safetensors"))
    with pytest.raises(ConversionError, match="model-extra.safetensors: tensor model.norm.weight also appears in"):
        open_checkpoint(tmp_path, "safetensors")


# ---- Trainer folders and PyTorch files ------------------------------------------------------------

class TrainingArguments:
    """Stands in for what Trainer pickles into training_args.bin: weights_only loading refuses it."""


def trainer_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(TINY / "model.safetensors"))
    torch.save(tensors, folder / "pytorch_model.bin")
    torch.save(TrainingArguments(), folder / "training_args.bin")
    torch.save({"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": 3}, folder / "scheduler.pt")
    torch.save({"scale": 1.0}, folder / "scaler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    torch.save({"python": 1}, folder / "rng_state_1.pth")
    (folder / "trainer_state.json").write_text("{}")
    return tensors


def test_trainer_checkpoint_folder_reads_only_the_weights(tmp_path):
    tensors = trainer_folder(tmp_path)
    assert checkpoint_files(tmp_path, "pytorch") == [tmp_path / "pytorch_model.bin"]
    source = open_checkpoint(tmp_path, "pytorch")
    assert sorted(source.names()) == sorted(tensors)
    source.close()


def test_trainer_folder_converts_end_to_end(tmp_path):
    ckpt = tmp_path / "checkpoint-500"
    ckpt.mkdir()
    trainer_folder(ckpt)
    (ckpt / "config.json").write_bytes((TINY / "config.json").read_bytes())
    out = tmp_path / "out"
    result = run_convert(*base_args(ckpt, out, "--ckpt-format", "pytorch"))
    assert result.exit_code == 0, result.output
    assert (out / "model.bin").is_file()


def test_folder_with_only_training_state_says_so(tmp_path):
    trainer_folder(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ConversionError, match=r"no .bin or .pt or .pth files in this folder \(only training state: "
                                              r"optimizer.pt, rng_state.pth"):
        open_checkpoint(tmp_path, "pytorch")


def save(path: Path, value: object) -> Path:
    torch.save(value, path)
    return path


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model", "module"])
def test_pytorch_state_dict_nested_the_common_ways(wrapper, tmp_path):
    tensors = {"model.norm.weight": torch.ones(4), "model.embed_tokens.weight": torch.zeros(8, 4)}
    path = save(tmp_path / "model.pt", {wrapper: tensors, "epoch": 3, "optimizer": {"lr": 1e-4}})
    source = open_checkpoint(path, "pytorch")
    assert sorted(source.names()) == sorted(tensors)
    with source.rows("model.norm.weight", 0, 1) as chunk:
        assert torch.equal(chunk, tensors["model.norm.weight"])
    source.close()


@pytest.mark.parametrize("case,value,words", [
    ("a list", [torch.zeros(2)], ["expected a state dict", "list"]),
    ("a bare tensor", torch.zeros(2), ["expected a state dict", "Tensor"]),
    ("a number among tensors", {"w": torch.zeros(2), "step": 3}, ["entry 'step'", "int", "not a tensor"]),
    ("a nested dict that is no known wrapper", {"weights": {"w": torch.zeros(2)}}, ["entry 'weights'", "dict"]),
    ("integer keys", {0: torch.zeros(2)}, ["entry 0"]),
    ("an integer tensor", {"w": torch.zeros(2, dtype=torch.int64)}, ["tensor w", "int64", "float32"]),
    ("a sparse tensor", {"w": torch.zeros(2, 2).to_sparse()}, ["tensor w", "sparse"]),
])
def test_pytorch_files_that_are_not_state_dicts_of_float_tensors(case, value, words, tmp_path):
    path = save(tmp_path / "model.bin", value)
    with pytest.raises(ConversionError) as error:
        open_checkpoint(path, "pytorch")
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("damage", ["truncated", "garbage pickle", "empty"])
def test_corrupt_pytorch_zip_is_one_line(damage, tmp_path):
    path = save(tmp_path / "model.bin", {"w": torch.arange(64.0)})
    good = path.read_bytes()
    if damage == "garbage pickle":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02garbage")
            archive.writestr("archive/version", b"3\n")
    else:
        path.write_bytes(good[: len(good) * 2 // 3] if damage == "truncated" else b"")
    with pytest.raises(ConversionError) as error:
        open_checkpoint(path, "pytorch")
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_tensor_names_with_control_characters_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"model.norm\nerror: all fine": entry(0, 8)}, bytes(8)))
    with pytest.raises(ConversionError, match=r"tensor name 'model.norm\\nerror: all fine' holds control characters"):
        open_checkpoint(path, "safetensors")
    with pytest.raises(ConversionError, match="control characters"):
        open_checkpoint(save(tmp_path / "model.bin", {"a\rb": torch.zeros(2)}), "pytorch")


# ---- a LoRA adapter given as the base --------------------------------------------------------------

@pytest.mark.parametrize("given", ["folder", "file"])
def test_lora_adapter_as_base_checkpoint_says_to_use_lora_ckpt(given, tiny_lora, tmp_path):
    path = tiny_lora if given == "folder" else tiny_lora / "adapter_model.safetensors"
    out = tmp_path / "out"
    result = run_convert(*base_args(path, out))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "LoRA adapter" in lines[0] and "--lora-ckpt" in lines[0], lines
    assert str(path) in lines[0] and not out.exists()


def test_renamed_adapter_file_is_recognised_by_its_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((TINY_LORA / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=r"model.safetensors: this is a LoRA adapter \(tensor .*lora_[AB]"):
        open_checkpoint(path, "safetensors")


# ---- tensors of 2 GiB or more -----------------------------------------------------------------------

def test_tensor_spec_refuses_2_gib_and_takes_one_byte_less():
    tflite.TensorSpec("w", tflite.FLOAT32, 2**31 - 1)
    with pytest.raises(ConversionError, match=r"output tensor w would hold 2,147,483,648 bytes.*--quantization"):
        tflite.TensorSpec("w", tflite.FLOAT32, 2**31)


def test_buffers_beyond_4_gib_round_trip_through_writer_and_reader(tmp_path):
    """Three tensors just under 2 GiB put the last one past 4 GiB: uint64 offsets, sparse file."""
    big = 2**31 - 1
    tensors = [tflite.TensorSpec(f"t{i}", tflite.INT8, big) for i in range(3)]
    path = tmp_path / "big.bin"
    with tflite.WeightFileWriter(path, "GEMMA_7B", tensors, METADATA) as writer:
        for spec in tensors:
            writer.write(spec.name, np.full(16, 7, dtype=np.uint8), start=big - 16)
    weights = tflite.WeightFile(path)
    offsets = [weights.tensors[f"t{i}"].offset for i in range(3)]
    assert offsets[2] > 2**32 and all(weights.tensors[f"t{i}"].nbytes == big for i in range(3))
    assert path.stat().st_size == tflite.roundup(offsets[2] + big, 65536)
    assert np.asarray(weights.raw("t2")[-16:]).tolist() == [7] * 16


def gemma_7b_sized_checkpoint(folder: Path) -> None:
    """A one-layer checkpoint with Gemma 7B's widths (its 3.1 GB fp32 embedding), as a sparse file."""
    family, model_type = find_model_type("GEMMA_7B")
    from converter.models.base import dims_from_config

    config = {"model_type": "gemma", "num_hidden_layers": 1, "hidden_size": 3072, "intermediate_size": 24576,
              "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "vocab_size": 256000}
    dims = dims_from_config(family, config, "config.json")
    names = [(r.hf, r.shape) for r in family.head + family.tail]
    names += [(family.layer_prefix.format(i=0) + r.hf, r.shape) for r in family.layer]
    header, position = {}, 0
    for name, shape in names:
        if name in header:
            continue
        size = int(np.prod(dims.shape(shape))) * 4
        header[name] = entry(position, position + size, dims.shape(shape))
        position += size
    text = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + position)
    (folder / "config.json").write_text(json.dumps(config))


def test_fp32_gemma_7b_embedding_is_refused_up_front_even_in_dry_run(tmp_path):
    ckpt = tmp_path / "gemma-7b"
    ckpt.mkdir()
    gemma_7b_sized_checkpoint(ckpt)
    out = tmp_path / "out"
    args = [*base_args(ckpt, out), "--dry-run"]
    args[args.index(TOKENIZER)] = padded_tokenizer(tmp_path / "tokenizer.model", 256000)
    args[args.index("GEMMA_2B")] = "GEMMA_7B"
    result = run_convert(*args, "--quantization", "fp32")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "3,145,728,000 bytes" in lines[0] and "2 GiB" in lines[0], lines
    assert "--quantization" in lines[0] and not out.exists()
    result = run_convert(*args, "--quantization", "fp16")
    assert result.exit_code == 0, result.output
    assert "1,572,864,000" in result.stdout


def test_tensor_size_limit_applies_to_a_real_conversion(tmp_path, monkeypatch):
    """The same refusal on the tiny model at a lowered limit; at the real one it converts in fp32."""
    out = tmp_path / "out"
    result = run_convert(*base_args(TINY, out, "--quantization", "fp32"))
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(tflite, "MAX_TENSOR_BYTES", 512 * 64 * 4 - 1)  # the tiny embedding is 512 x 64 floats
    result = run_convert(*base_args(TINY, tmp_path / "out2", "--quantization", "fp32"))
    assert result.exit_code == 1 and "131,072 bytes" in result.stderr and not (tmp_path / "out2").exists()


# ---- corrupt TFLite weights files ------------------------------------------------------------------

@pytest.fixture
def weights_file(tmp_path) -> Path:
    path = tmp_path / "w.bin"
    write(path)
    return path


def flatbuffer_positions(path: Path) -> dict[str, int]:
    """Where the fields a hostile edit targets lie in the file our writer produced."""
    reader = tflite._FlatReader(np.fromfile(path, dtype=np.uint8), path)
    model = reader.table(reader.number("<I", 0))
    buffers = reader.tables(model, tflite.MODEL_BUFFERS, "buffer")
    tensor = reader.tables(reader.tables(model, tflite.MODEL_SUBGRAPHS, "subgraph")[0], tflite.SUBGRAPH_TENSORS, "t")[0]
    return {"buffers vector": reader.target(model, tflite.MODEL_BUFFERS),
            "last buffer offset": reader.field(buffers[-1], tflite.BUFFER_OFFSET),
            "last buffer size": reader.field(buffers[-1], tflite.BUFFER_SIZE),
            "tensor buffer": reader.field(tensor, tflite.TENSOR_BUFFER),
            "tensor name": reader.target(tensor, tflite.TENSOR_NAME),
            "tensor vtable": tensor[0]}


@pytest.mark.parametrize("case,field,fmt,value,words", [
    ("root past the end", None, "<I", 2**31, ["outside"]),
    ("huge buffer count", "buffers vector", "<I", 2**31, ["buffer list claims 2147483648 entries"]),
    ("buffer offset past the end", "last buffer offset", "<Q", 2**62, ["beyond the end"]),
    ("buffer size past the end", "last buffer size", "<Q", 2**40, ["beyond the end"]),
    ("offset + size overflowing 64 bits", "last buffer size", "<Q", 2**64 - 1, ["beyond the end"]),
    ("tensor buffer index out of range", "tensor buffer", "<I", 999, ["tensor a.w uses buffer 999"]),
    ("huge name", "tensor name", "<I", 2**31, ["tensor name claims"]),
    ("vtable outside the file", "tensor vtable", "<i", -2**31 + 1, ["outside"]),
])
def test_hostile_flatbuffer_fields(case, field, fmt, value, words, weights_file):
    data = bytearray(weights_file.read_bytes())
    position = 0 if field is None else flatbuffer_positions(weights_file)[field]
    struct.pack_into(fmt, data, position, value)
    weights_file.write_bytes(bytes(data))
    with pytest.raises(ConversionError) as error:
        tflite.WeightFile(weights_file)
    message = str(error.value)
    assert message.startswith(str(weights_file)) and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_every_truncation_and_random_damage_is_a_conversion_error_or_a_file(weights_file):
    """Cut at every byte of the flatbuffer, and flip random bytes in it: never another exception."""
    good = weights_file.read_bytes()
    size = len(tflite.plan_layout("GEMMA_2B", TENSORS, METADATA).flatbuffer)
    for cut in range(size + 1):
        weights_file.write_bytes(good[:cut])
        with pytest.raises(ConversionError):
            tflite.WeightFile(weights_file)
    rng = random.Random(11)
    for _ in range(1500):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(size)] = rng.randrange(256)
        weights_file.write_bytes(bytes(data))
        try:
            weights = tflite.WeightFile(weights_file)
        except ConversionError as error:
            assert "\n" not in str(error)
            continue
        for name in weights.tensors:
            assert len(weights.raw(name)) == weights.tensors[name].nbytes


@pytest.mark.parametrize("data,words", [
    (b"", ["cannot read"]),
    (b"\x00" * 64, ["no TFL3"]),
    (b"PK\x03\x04" + b"\x00" * 60, ["no TFL3"]),
    (b"\x08\x00\x00\x00TFL3", ["corrupt TFLite weights file"]),
    (b"\x0c\x00\x00\x00TFL3\x04\x00\x08\x00\x04\x00\x00\x00", ["no subgraph"]),
])
def test_files_that_are_not_weights_files(data, words, tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    with pytest.raises(ConversionError) as error:
        tflite.WeightFile(path)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_duplicate_tensor_names_are_refused(tmp_path):
    path = tmp_path / "w.bin"
    write(path, tensors=[tflite.TensorSpec("a", tflite.INT8, 4), tflite.TensorSpec("b", tflite.INT8, 4)])
    data = path.read_bytes()
    position = flatbuffer_positions(path)["tensor name"]
    path.write_bytes(data[:position + 4] + b"b" + data[position + 5:])
    with pytest.raises(ConversionError, match="tensor b appears twice"):
        tflite.WeightFile(path)


def test_missing_tensor_is_named_by_the_reader(weights_file):
    """Parameters that claim more layers than the file holds: the first missing tensor, by name."""
    weights = tflite.WeightFile(weights_file)
    for read in (weights.entry, weights.raw, weights.vector, lambda n: weights.matrix(n, 4, 4)):
        with pytest.raises(ConversionError, match=r"w.bin: no tensor params.lm.transformer.x_layers_7.w"):
            read("params.lm.transformer.x_layers_7.w")
    assert weights.entry("a.w").nbytes == 1000


def test_sizes_from_the_parameters_that_the_file_does_not_hold_are_named(weights_file):
    """Parameters that claim other sizes: one ConversionError naming the tensor, never a reshape error."""
    weights = tflite.WeightFile(weights_file)
    assert weights.vector("norm.scale").numel() == 3
    cases = [(lambda: weights.vector("norm.scale", 4), "tensor norm.scale has 12 bytes, not 4 float32 values"),
             (lambda: weights.vector("a.w.sum_i", 9), "tensor a.w.sum_i has 40 bytes, not 9"),
             (lambda: weights.matrix("norm.scale", 3, 1), r"norm.scale cannot be a \[3, 1\] matrix"),
             (lambda: weights.matrix("norm.scale", 0, 4), r"cannot be a \[0, 4\] matrix"),
             (lambda: weights.matrix("a.w", 20, 52), "no tensor a.w_quantized_scale"),
             (lambda: weights.matrix("a.w.sum_i", 4, 4), r"a.w.sum_i has 40 bytes, not a \[4, 4\] matrix")]
    for read, message in cases:
        with pytest.raises(ConversionError, match=message):
            read()


@pytest.mark.parametrize("scale_bytes", [8, 16])
def test_int8_matrix_needs_one_scale_a_row(scale_bytes, tmp_path):
    path = tmp_path / "w.bin"
    write(path, tensors=[tflite.TensorSpec("x_quantized_scale", tflite.FLOAT32, scale_bytes),
                         tflite.TensorSpec("x", tflite.INT8, 16)])
    weights = tflite.WeightFile(path)
    if scale_bytes == 16:
        assert weights.matrix("x", 4, 4).shape == (4, 4)
        return
    with pytest.raises(ConversionError, match=r"tensor x has 16 bytes and 8 bytes of scales, not an int8 \[4, 4\]"):
        weights.matrix("x", 4, 4)


def test_bundle_inspect_of_a_hostile_weights_file_is_one_line(weights_file):
    from click.testing import CliRunner

    from bundler.cli import main

    data = bytearray(weights_file.read_bytes())
    struct.pack_into("<I", data, flatbuffer_positions(weights_file)["buffers vector"], 2**30)
    weights_file.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["inspect", str(weights_file)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "w.bin" in lines[0], result.output


# ---- fused tensors ------------------------------------------------------------------------------------

def test_fused_tensor_that_does_not_split_into_whole_heads_is_refused(tmp_path):
    from converter.split import SplittingSource

    fused = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)
    save_file({"qkv": fused, "odd": torch.zeros(10, 4)}, str(tmp_path / "model.safetensors"))
    source = SplittingSource(open_checkpoint(tmp_path / "model.safetensors", "safetensors"))
    k = source.add_slice("qkv", 1, 3, 2)
    with source.rows(k, 0, 4) as chunk:
        assert torch.equal(chunk, fused.reshape(-1, 3, 2, 4)[:, 1].reshape(4, 4))
    with pytest.raises(ConversionError, match=r"tensor odd has 10 rows, not groups of 3 x 2"):
        source.add_slice("odd", 0, 3, 2)
    source.close()
