"""Parity with MediaPipe 0.10.21, cheaply.

1. Live: MediaPipe's own Python half (read, map, quantize: `oracle_convert.py --bins-only`) runs
   in the oracle venv on real-named Gemma tensors with awkward values; its int8/int4 values and
   scales must equal ours.
2. Recorded: MediaPipe's full GEMMA_2B output (its closed C++ step tiles, offsets and sums) was
   digested by `scripts/parity.py --record`; tensors regenerated from their seeds and encoded
   by our per-tensor code must hash the same, and so must the flatbuffer region of the plan.
The whole-file comparison is `scripts/parity.py` (minutes, 9 GiB for MediaPipe).
Set REQUIRE_ORACLE=1 (CI does) to make a missing oracle venv a failure instead of a skip.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converter import quantize, tflite
from converter.adapter import load_adapter
from converter.checkpoint import TensorInfo, TensorSource
from converter.config import ConversionConfig
from converter.convert import WRITERS
from converter.models import find_model_type
from converter.plan import ConversionPlan, plan_base, plan_lora

from .conftest import ROOT, TOKENIZER

sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import ATTENTION_TARGETS, PRESETS, hf_config, model_shapes, random_tensor, write_adapter  # noqa: E402

pytestmark = pytest.mark.oracle
RECORDS = ROOT / "fixtures" / "oracle"
LAYER = 3


def oracle_python() -> str:
    path = Path(os.environ.get("ORACLE_VENV", ROOT / ".oracle-venv")) / "bin" / "python"
    if not path.exists():
        message = f"oracle venv not found at {path}: run scripts/setup_oracle.sh"
        if os.environ.get("REQUIRE_ORACLE"):
            pytest.fail(message)
        pytest.skip(message)
    return str(path)


def awkward_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random weights plus rows that stress the math: zeros, exact .5 ties, an outlier, tiny values."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0] = 0.0
    w[1] = torch.arange(cols, dtype=torch.float32) % 8 - 3.5  # bound 4.5 -> ties at k + 0.5 for int8 and int4
    w[1, 0] = 127.0 / 16  # makes scale exactly 1/16 for int8
    w[2, 7] = 50.0
    w[3] *= 1e-30
    return w


MP_NAMES = {
    "model.layers.0.self_attn.q_proj.weight": ("params.lm.transformer.x_layers_0.self_attention.q.w", True),
    "model.layers.0.self_attn.o_proj.weight": ("params.lm.transformer.x_layers_0.self_attention.post.w", False),
    "model.layers.0.mlp.down_proj.weight": ("params.lm.transformer.x_layers_0.ff_layer.ffn_layer2.w", True),
}  # HF name -> (MediaPipe bin name, whether that bin holds the matrix transposed as [in, out])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_matches_mediapipes_python_half(tmp_path, bits):
    tensors = {name: awkward_matrix(96, 160, i).to(torch.bfloat16) for i, name in enumerate(MP_NAMES)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    bins = tmp_path / "bins"
    subprocess.run([oracle_python(), str(ROOT / "scripts" / "oracle_convert.py"), "--bins-only",
                    "--model-type", "GEMMA_2B", "--input-ckpt", str(tmp_path / "model.safetensors"),
                    "--vocab-model-file", str(TOKENIZER), "--bits", str(bits), "--output-dir", str(bins),
                    "--output-tflite-file", str(tmp_path / "unused.bin")], check=True, capture_output=True, cwd=tmp_path)
    for name, (mp_name, transposed) in MP_NAMES.items():
        ours = quantize.quantize_tiled(tensors[name], bits)
        our_values = quantize.untile(ours.tiled.flatten() if bits == 8 else quantize.unpack_int4(ours.tiled.flatten()),
                                     96, 160).to(torch.int16) - 2 ** (bits - 1)
        raw = np.fromfile(bins / mp_name, dtype=np.int8)
        if bits == 4:  # MediaPipe packs the flattened tensor two signed nibbles per byte, low first
            low = (raw.astype(np.int16) << 12 >> 12)
            high = raw.astype(np.int16) >> 4
            raw = np.stack([low, high], axis=1).reshape(-1)
        theirs = raw.reshape((160, 96) if transposed else (96, 160)).astype(np.int16)
        theirs = theirs.T if transposed else theirs
        np.testing.assert_array_equal(our_values.numpy(), theirs, err_msg=f"{name} values ({bits}-bit)")
        their_scale = np.fromfile(bins / f"{mp_name}_quantized_scale", dtype=np.float32)
        assert ours.scale.numpy().tobytes() == their_scale.tobytes(), f"{name} scales ({bits}-bit)"


class SeededSource(TensorSource):
    """The real-shape checkpoint of scripts/make_checkpoint.py, each tensor generated on demand."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__({n: TensorInfo(n, s, torch.bfloat16, Path("seeded")) for n, s in shapes.items()})

    @functools.lru_cache(maxsize=1)
    def tensor(self, name: str) -> torch.Tensor:
        return random_tensor(name, self.infos[name].shape, 0, torch.bfloat16)

    def rows(self, name, start, stop):
        tensor = self.tensor(name)
        return contextlib.nullcontext(tensor[start:stop] if tensor.dim() > 1 else tensor)


class MemorySink:
    """Stands in for the file writer: each output tensor in its own buffer."""

    def __init__(self, items):
        self.buffers = {s.name: np.zeros(s.nbytes, dtype=np.uint8) for item in items for s in item.outputs}

    def write(self, name, data, start=0):
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self.buffers[name][start:start + raw.size] = raw

    def write_columns(self, name, block, column):
        rows, width = block.shape
        self.buffers[name].reshape(rows, -1)[:, column:column + width] = block

    def stage(self, rows, width):
        return np.empty((rows, width), dtype=np.uint8)

    write_stage = write_columns


def recorded(name: str) -> dict:
    return json.loads((RECORDS / name).read_text())


def gemma_2b_plan(quantization: str, adapter_dir: Path | None = None):
    shapes = model_shapes(hf_config(PRESETS["GEMMA_2B"]))
    family, model_type = find_model_type("GEMMA_2B")
    dims = model_type.reference
    source = SeededSource(shapes)
    config = ConversionConfig(input_ckpt="seeded", ckpt_format="safetensors", model_type="GEMMA_2B",
                              output_dir="unused", vocab_model_file=TOKENIZER, quantization=quantization,
                              mediapipe_compat=True, lora_ckpt=adapter_dir, lora_rank=8 if adapter_dir else None)
    plan = ConversionPlan(config, family, model_type, dims, family.parameters(dims, {}).SerializeToString(),
                          TOKENIZER.read_bytes(), source, plan_base(family, dims, source, quantization))
    if adapter_dir:
        write_adapter(shapes, adapter_dir, 8, 16.0, ATTENTION_TARGETS, 0, torch.bfloat16)
        plan.adapter = load_adapter(adapter_dir, family, dims, "GEMMA_2B")
        plan.lora = plan_lora(family, dims, plan.adapter, 8, compat=True, peft_scaling=False)
    return plan


def assert_matches_record(plan, items, record: dict) -> int:
    sink = MemorySink(items)
    for item in items:
        WRITERS[item.encoding](plan, item, sink, lambda n: None)
    for name, data in sink.buffers.items():
        assert hashlib.sha256(data).hexdigest() == record["tensors"][name]["sha256"], name
    return len(sink.buffers)


def assert_layout_matches_record(plan, items, lora_rank, record: dict) -> None:
    """The flatbuffer region (with its padding), file size, tensor order and offsets are MediaPipe's."""
    specs = [spec for item in items for spec in item.outputs]
    layout = tflite.plan_layout(plan.model_type.name, specs, plan.metadata(lora_rank))
    region = layout.flatbuffer + bytes(layout.blob_offsets[0] - len(layout.flatbuffer))
    assert hashlib.sha256(region).hexdigest() == record["flatbuffer_sha256"]
    assert layout.file_size == record["file_size"]
    assert [s.name for s in specs] == sorted(record["tensors"], key=lambda n: record["tensors"][n]["offset"])
    assert layout.tensor_offsets == sorted(t["offset"] for t in record["tensors"].values())


@pytest.mark.parametrize("quantization,record", [("int8", "gemma-2b-int8-lora8.json"), ("int4", "gemma-2b-int4.json")])
def test_real_shape_layer_matches_mediapipes_output(quantization, record):
    plan = gemma_2b_plan(quantization)
    digest = recorded(record)["base"]
    assert_layout_matches_record(plan, plan.base, None, digest)
    layer = [item for item in plan.base
             if f"layers.{LAYER}." in (item.source or "") or item.source == "model.norm.weight"]
    assert assert_matches_record(plan, layer, digest) == 3 * 7 + 2 + 1


def test_real_shape_lora_matches_mediapipes_output(tmp_path):
    plan = gemma_2b_plan("int8", tmp_path / "adapter")
    digest = recorded("gemma-2b-int8-lora8.json")["lora"]
    assert_layout_matches_record(plan, plan.lora, 8, digest)
    assert assert_matches_record(plan, plan.lora, digest) == 144


def timestamp_positions(path: Path) -> list[int]:
    """Byte positions of the DOS time/date fields of every local and central zip header."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        positions = [info.header_offset + 10 + k for info in archive.infolist() for k in range(4)]
        data = path.read_bytes()
        start = data.index(b"PK\x01\x02", max(info.header_offset for info in archive.infolist()))
    while (found := data.find(b"PK\x01\x02", start)) >= 0:
        positions += [found + 12 + k for k in range(4)]
        start = found + 4
    return positions


def test_bundle_matches_mediapipes_bundler(tmp_path):
    """Same entries, same order, same bytes; only MediaPipe's wall-clock timestamps differ."""
    from bundler.cli import main as bundle_main
    from click.testing import CliRunner

    from .conftest import TINY, base_args, run_convert

    assert run_convert(*base_args(TINY, tmp_path / "conv")).exit_code == 0
    model = tmp_path / "conv" / "model.bin"
    options = ["--tflite-model", str(model), "--tokenizer-model", str(TOKENIZER), "--start-token", "<bos>",
               "--stop-tokens", "<eos>", "--stop-tokens", "<end_of_turn>", "--system-prompt", "Be brief.",
               "--prompt-prefix", "<start_of_turn>user\n", "--prompt-suffix", "<end_of_turn>\n<start_of_turn>model\n",
               "--enable-bytes-to-unicode-mapping"]
    theirs, ours = tmp_path / "mediapipe.task", tmp_path / "ours.task"
    subprocess.run([oracle_python(), str(ROOT / "scripts" / "oracle_bundle.py"), *options,
                    "--output-filename", str(theirs)], check=True, capture_output=True, cwd=tmp_path)
    result = CliRunner().invoke(bundle_main, [*[o.replace("\n", "\\n") for o in options], "--output-filename", str(ours)])
    assert result.exit_code == 0, result.output
    a, b = bytearray(ours.read_bytes()), bytearray(theirs.read_bytes())
    assert len(a) == len(b)
    positions = timestamp_positions(theirs)
    assert positions == timestamp_positions(ours) and len(positions) == 24
    for position in positions:
        a[position] = b[position] = 0
    assert a == b
