"""Parity of the Gemma families with MediaPipe 0.10.21, cheaply (see tests/test_oracle.py for the method).

1. GEMMA2_2B, recorded: MediaPipe's full real-shape output (int8 + rank-8 LoRA, int4) was digested by
   `scripts/parity.py --preset GEMMA2_2B --record`; a regenerated layer, the LoRA file and the
   flatbuffer region of the plan must hash the same.
2. GEMMA_7B, live: MediaPipe cannot convert a 7B here (killed for memory at 22.9 GiB), so its
   Python half (read, map, quantize) runs on one real-shape 7B layer, and MediaPipe's C++ encoding
   (tile4 of uint8(q + 128), int32 row sums, raw scales; checked byte for byte on the whole GEMMA_2B
   and GEMMA2_2B files) is applied to its output here to give the bytes its file would hold.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converter.config import ConversionConfig
from converter.convert import WRITERS
from converter.adapter import load_adapter
from converter.models import find_model_type
from converter.plan import ConversionPlan, plan_base, plan_lora

from .conftest import ROOT, TOKENIZER
from .test_oracle import (ATTENTION_TARGETS, PRESETS, MemorySink, SeededSource, assert_layout_matches_record,
                          assert_matches_record, hf_config,
                          model_shapes, oracle_python, random_tensor, recorded, write_adapter)

pytestmark = pytest.mark.oracle
LAYER = 3


def real_shape_plan(preset: str, quantization: str, adapter_dir=None) -> ConversionPlan:
    shapes = model_shapes(hf_config(PRESETS[preset]))
    family, model_type = find_model_type(preset)
    dims = model_type.reference
    source = SeededSource(shapes)
    config = ConversionConfig(input_ckpt="seeded", ckpt_format="safetensors", model_type=preset, output_dir="unused",
                              vocab_model_file=TOKENIZER, quantization=quantization, mediapipe_compat=True,
                              lora_ckpt=adapter_dir, lora_rank=8 if adapter_dir else None)
    plan = ConversionPlan(config, family, model_type, dims, family.parameters(dims, {}).SerializeToString(),
                          TOKENIZER.read_bytes(), source, plan_base(family, dims, source, quantization))
    if adapter_dir:
        write_adapter(shapes, adapter_dir, 8, 16.0, ATTENTION_TARGETS, 0, torch.bfloat16)
        plan.adapter = load_adapter(adapter_dir, family, dims, preset)
        plan.lora = plan_lora(family, dims, plan.adapter, 8, compat=True, peft_scaling=False)
    return plan


def layer_items(plan: ConversionPlan, layer: int = LAYER) -> list:
    return [item for item in plan.base if f"layers.{layer}." in (item.source or "")
            or item.source == "model.norm.weight"]


@pytest.mark.parametrize("quantization,record", [("int8", "gemma2-2b-int8-lora8.json"), ("int4", "gemma2-2b-int4.json")])
def test_gemma2_2b_layer_and_layout_match_mediapipes_output(quantization, record):
    plan = real_shape_plan("GEMMA2_2B", quantization)
    digest = recorded(record)["base"]
    assert_layout_matches_record(plan, plan.base, None, digest)
    assert assert_matches_record(plan, layer_items(plan), digest) == 7 * 3 + 4 + 1


def test_gemma2_2b_lora_matches_mediapipes_output(tmp_path):
    plan = real_shape_plan("GEMMA2_2B", "int8", tmp_path / "adapter")
    digest = recorded("gemma2-2b-int8-lora8.json")["lora"]
    assert_layout_matches_record(plan, plan.lora, 8, digest)
    assert assert_matches_record(plan, plan.lora, digest) == 26 * 8


def spec_tile4(matrix: np.ndarray) -> np.ndarray:
    """The documented GPU layout: W[O, I] -> W.reshape(O/4, 4, I/4, 4).transpose(2, 0, 3, 1), flattened."""
    rows, cols = matrix.shape
    return matrix.reshape(rows // 4, 4, cols // 4, 4).transpose(2, 0, 3, 1).reshape(-1)


def test_gemma_7b_layer_matches_mediapipes_quantizer_and_encoding(tmp_path):
    """One real-shape GEMMA_7B layer (q/k/v/o 4096x3072, MLP 24576x3072, norms): MediaPipe's Python half
    quantizes it, the documented C++ encoding turns that into file bytes, and ours are identical."""
    python = oracle_python()
    plan = real_shape_plan("GEMMA_7B", "int8")
    items = layer_items(plan)
    tensors = {item.source: random_tensor(item.source, item.shape, 0, torch.bfloat16) for item in items}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    bins = tmp_path / "bins"
    subprocess.run([python, str(ROOT / "scripts" / "oracle_convert.py"), "--bins-only", "--model-type", "GEMMA_7B",
                    "--input-ckpt", str(tmp_path / "model.safetensors"), "--vocab-model-file", str(TOKENIZER),
                    "--output-dir", str(bins), "--output-tflite-file", str(tmp_path / "unused.bin")],
                   check=True, capture_output=True, cwd=tmp_path)
    del tensors
    sink = MemorySink(items)
    for item in items:
        WRITERS[item.encoding](plan, item, sink, lambda n: None)
    checked = 0
    for item in items:
        if item.encoding == "float32":
            name = item.outputs[0].name
            assert sink.buffers[name].tobytes() == (bins / name).read_bytes(), name
            checked += 1
            continue
        name = next(s.name for s in item.outputs if not s.name.endswith((".sum_i", "_quantized_scale")))
        rows, cols = item.shape
        values = np.fromfile(bins / name, dtype=np.int8)
        # MediaPipe's bins hold [in, out] matrices, except the Gemma o_proj ("post") it transposes back.
        q = values.reshape(rows, cols) if ".post." in name else values.reshape(cols, rows).T
        scale = (bins / f"{name}_quantized_scale").read_bytes()
        assert sink.buffers[name].tobytes() == spec_tile4((q.astype(np.int16) + 128).astype(np.uint8)).tobytes(), name
        assert sink.buffers[f"{name}.sum_i"].tobytes() == q.astype(np.int32).sum(1).astype(np.int32).tobytes(), name
        assert sink.buffers[f"{name}_quantized_scale"].tobytes() == scale, name
        checked += 1
    assert checked == 9 + 1  # 7 matrices, 2 norms, the final norm
