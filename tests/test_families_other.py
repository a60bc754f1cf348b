"""Phi-2, Falcon-RW and StableLM: converted tiny random transformers models run in the reference
runtime as transformers (+ PEFT) run them; LlmParameters and refusals; cheap MediaPipe parity.

Each tiny model is built from its transformers config with real-model settings (Phi-2's partial
rotary and parallel block, falcon-rw-1b's ALiBi and fused per-head qkv, StableLM's partial rotary
and gated SiLU MLP) and random weights, saved the way its real checkpoints are (Falcon: one
PyTorch `.bin`, also a safetensors copy without the tied `lm_head`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from converter.tflite import WeightFile
from harness.reference import ReferenceModel

from .conftest import ROOT, TOKENIZER, run_convert
from .test_oracle import assert_layout_matches_record

TINY_CONFIGS = {
    "PHI_2": dict(model_type="phi", vocab_size=512, hidden_size=80, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, partial_rotary_factor=0.4, bos_token_id=1, eos_token_id=2),
    "FALCON_RW_1B": dict(model_type="falcon", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, alibi=True, bias=True, multi_query=False, parallel_attn=False,
                         new_decoder_architecture=False, bos_token_id=1, eos_token_id=2),
    "STABLELM_4E1T_3B": dict(model_type="stablelm", vocab_size=512, hidden_size=64, intermediate_size=160,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             bos_token_id=0, eos_token_id=0),
}
PROMPTS = ([2, 17, 300, 5, 9, 44, 101], [7])
# The LlmParameters bytes MediaPipe 0.10.21's GPU converter writes for the real sizes
# (shared/reference/mediapipe-format.md, section 4.2, read out of its output files).
MEDIAPIPE_PARAMETERS = {
    "PHI_2": "0a2e08011880142080502850302038205a06100118012001620068037001780382010418012802900101b80101c00101108090"
             "0320d088032a0d3c7c656e646f66746578747c3e",
    "FALCON_RW_1B": "0a32080118801020804028403020381848205a0610011803200162020801680370017803820104180128029001"
                    "01b80101c001011080890320012a0d3c7c656e646f66746578747c3e",
    "STABLELM_4E1T_3B": "0a3608011880142080362850302038205a080801100218032001620208016803700178038201080801100118"
                        "012802900101b80101c001011080890320002a0d3c7c656e646f66746578747c3e",
}


def hf_model(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**TINY_CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(sorted(TINY_CONFIGS).index(model_type))
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a misplaced one shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def save(model, folder: Path, pytorch: bool) -> Path:
    """safetensors via save_pretrained, or one pytorch_model.bin state dict (tied tensors included)."""
    model.save_pretrained(str(folder))
    if pytorch:
        for file in folder.glob("*.safetensors"):
            file.unlink()
        torch.save(model.state_dict(), str(folder / "pytorch_model.bin"))
    return folder


def convert(checkpoint: Path, model_type: str, out: Path, quantization: str, *extra) -> Path:
    fmt = "pytorch" if any(checkpoint.glob("*.bin")) else "safetensors"
    result = run_convert("--model-type", model_type, "--input-ckpt", checkpoint, "--ckpt-format", fmt,
                         "--vocab-model-file", TOKENIZER, "--output-dir", out, "--output-tflite-file",
                         out / "model.bin", "--quantization", quantization, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return out


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def dequantized_like_int8(model) -> None:
    """Replace every matrix by its symmetric per-row int8 round trip (scale = max|w| / 127)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                scale = parameter.abs().amax(1, keepdim=True) / 127
                scale[scale == 0] = 1
                parameter.copy_(torch.round(parameter / scale) * scale)


def greedy(step, ids: list[int], count: int) -> list[int]:
    out = []
    for _ in range(count):
        token = int(step(ids + out)[-1].argmax())
        out.append(token)
    return out


CASES = [("PHI_2", False), ("FALCON_RW_1B", True), ("FALCON_RW_1B", False), ("STABLELM_4E1T_3B", False)]


@pytest.mark.parametrize("model_type,pytorch", CASES, ids=["phi2", "falcon-bin", "falcon-tied", "stablelm"])
@pytest.mark.parametrize("quantization", ["fp32", "int8"])
def test_reference_runtime_agrees_with_transformers(tmp_path, model_type, pytorch, quantization):
    model = hf_model(model_type)
    checkpoint = save(model, tmp_path / "ckpt", pytorch)
    if model_type == "FALCON_RW_1B":  # the .bin keeps the tied lm_head; save_pretrained's safetensors drop it
        from converter.checkpoint import open_checkpoint

        source = open_checkpoint(checkpoint, "pytorch" if pytorch else "safetensors")
        assert ("lm_head.weight" in source.names()) == pytorch
        source.close()
    out = convert(checkpoint, model_type, tmp_path / "out", quantization)
    if quantization == "int8":
        dequantized_like_int8(model)
    ours = ReferenceModel(WeightFile(out / "model.bin"))
    for ids in PROMPTS:
        torch.testing.assert_close(ours.forward(ids)[0], logits(model, ids), atol=1e-4, rtol=0)
    prompt = PROMPTS[0]
    assert greedy(lambda ids: ours.forward(ids)[0], prompt, 6) == greedy(lambda ids: logits(model, ids), prompt, 6)


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    out = convert(save(hf_model("FALCON_RW_1B"), tmp_path / "ckpt", True), "FALCON_RW_1B", tmp_path / "out", "fp32")
    ours = ReferenceModel(WeightFile(out / "model.bin"))
    ids = PROMPTS[0]
    first, cache = ours.forward(ids[:4])
    rest, _ = ours.forward(ids[4:], cache)
    torch.testing.assert_close(torch.cat([first, rest]), ours.forward(ids)[0], atol=1e-5, rtol=0)


def test_phi2_lora_agrees_with_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = hf_model("PHI_2")
    checkpoint = save(model, tmp_path / "ckpt", False)
    lora = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "dense"],
                      init_lora_weights=False)
    torch.manual_seed(5)
    peft = get_peft_model(hf_model("PHI_2"), lora).eval()
    peft.save_pretrained(str(tmp_path / "adapter"))
    out = convert(checkpoint, "PHI_2", tmp_path / "out", "fp32", "--lora-ckpt", tmp_path / "adapter",
                  "--lora-rank", 4)
    base = ReferenceModel(WeightFile(out / "model.bin"))
    adapted = ReferenceModel(WeightFile(out / "model.bin"), WeightFile(out / "lora.tflite"))
    lora_file = WeightFile(out / "lora.tflite")  # Phi-2's halves are float32 (4 bytes a value)
    assert lora_file.tensors["params.lm.transformer.x_layers_1.self_attention.post.w_prime_right"].nbytes == 4 * 4 * 80
    for ids in PROMPTS:
        ours_base, ours_lora = base.forward(ids)[0], adapted.forward(ids)[0]
        theirs_lora = logits(peft, ids)
        torch.testing.assert_close(ours_lora, theirs_lora, atol=1e-4, rtol=0)
        with peft.disable_adapter():
            theirs_base = logits(peft, ids)
        assert (theirs_lora - theirs_base).abs().max() > 0.2  # the adapter matters
        torch.testing.assert_close(ours_base, theirs_base, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["FALCON_RW_1B", "STABLELM_4E1T_3B"])
def test_lora_is_refused_where_the_runtime_takes_none(tmp_path, model_type):
    checkpoint = save(hf_model(model_type), tmp_path / "ckpt", False)
    (tmp_path / "adapter").mkdir()
    result = run_convert("--model-type", model_type, "--input-ckpt", checkpoint, "--vocab-model-file", TOKENIZER,
                         "--output-dir", tmp_path / "out", "--lora-ckpt", tmp_path / "adapter", "--lora-rank", 4)
    assert result.exit_code == 1
    assert f"LoRA is not supported for {model_type}" in result.output
    assert "--merge-lora" in result.output
    assert not (tmp_path / "out" / "model.tflite").exists()


@pytest.mark.parametrize("model_type,override,message", [
    ("PHI_2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ("FALCON_RW_1B", {"multi_query": True}, "multi_query True"),
    ("FALCON_RW_1B", {"alibi": False}, "alibi False"),
    ("STABLELM_4E1T_3B", {"use_qkv_bias": True}, "use_qkv_bias True"),
])
def test_settings_the_runtime_fixes_are_checked(tmp_path, model_type, override, message):
    checkpoint = save(hf_model(model_type, **override), tmp_path / "ckpt", False)
    result = run_convert("--model-type", model_type, "--input-ckpt", checkpoint, "--vocab-model-file", TOKENIZER,
                         "--output-dir", tmp_path / "out")
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("model_type", sorted(MEDIAPIPE_PARAMETERS))
def test_real_size_parameters_are_mediapipes_bytes(model_type):
    """A real-size transformers config (make_checkpoint's preset) gives exactly MediaPipe's bytes."""
    import sys

    from converter.models import find_model_type
    from converter.models.base import dims_from_config

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_checkpoint import PRESETS, hf_config

    config = hf_config(PRESETS[model_type]).to_dict()
    family, kind = find_model_type(model_type)
    dims = dims_from_config(family, family.text_config(config), "config.json")
    assert dims == kind.reference
    assert family.parameters(dims, config).SerializeToString().hex() == MEDIAPIPE_PARAMETERS[model_type]
    assert family.parameters(kind.reference, {}).SerializeToString().hex() == MEDIAPIPE_PARAMETERS[model_type]


def test_falcon_qkv_split_matches_mediapipes_python_half(tmp_path):
    """MediaPipe's FalconMapper splits query_key_value with hard-coded 2048 x 64 heads: one real-width
    layer, its q/k/v weights and biases, int8 values and scales, must equal ours."""
    from tests.test_oracle import oracle_python

    from converter import quantize
    from converter.checkpoint import open_checkpoint
    from converter.models import find_model_type
    from converter.plan import plan_base
    from converter.split import SplittingSource

    python = oracle_python()
    generator = torch.Generator().manual_seed(3)
    prefix = "transformer.h.0.self_attention.query_key_value"
    fused = {f"{prefix}.weight": (torch.randn(6144, 2048, generator=generator) * 0.02).to(torch.bfloat16),
             f"{prefix}.bias": (torch.randn(6144, generator=generator) * 0.1).to(torch.bfloat16)}
    torch.save(fused, str(tmp_path / "falcon.bin"))
    bins = tmp_path / "bins"
    subprocess.run([python, str(ROOT / "scripts" / "oracle_convert.py"), "--bins-only", "--model-type", "FALCON_RW_1B",
                    "--ckpt-format", "pytorch", "--input-ckpt", str(tmp_path / "falcon.bin"), "--vocab-model-file",
                    str(TOKENIZER), "--output-dir", str(bins), "--output-tflite-file", str(tmp_path / "unused.bin")],
                   check=True, capture_output=True, cwd=tmp_path)
    family, kind = find_model_type("FALCON_RW_1B")
    source = SplittingSource(open_checkpoint(tmp_path / "falcon.bin", "pytorch"))
    layer = tuple(rule for rule in family.layer if "query_key_value" in rule.hf)
    one_layer = dataclasses.replace(family, head=(), layer=layer, tail=())
    items = plan_base(one_layer, dataclasses.replace(kind.reference, num_layers=1), source, "int8")
    assert len(items) == 6
    for item in items:
        mp_name = next(s.name for s in item.outputs if not s.name.endswith(("_quantized_scale", ".sum_i")))
        with source.rows(item.source, 0, item.shape[0]) as values:
            values = values.to(torch.float32).clone()
        if len(item.shape) == 1:  # biases: raw float32
            assert np.fromfile(bins / mp_name, dtype=np.float32).tobytes() == values.numpy().tobytes(), mp_name
            continue
        ours = quantize.quantize_tiled(values, 8)
        our_values = quantize.untile(ours.tiled.flatten(), 2048, 2048).to(torch.int16) - 128
        theirs = np.fromfile(bins / mp_name, dtype=np.int8).reshape(2048, 2048).T  # bins hold [in, out]
        np.testing.assert_array_equal(our_values.numpy(), theirs.astype(np.int16), err_msg=mp_name)
        scale = np.fromfile(bins / f"{mp_name}_quantized_scale", dtype=np.float32)
        assert ours.scale.numpy().tobytes() == scale.tobytes(), mp_name
    source.close()


def recorded_plan(model_type: str, quantization: str, adapter_dir: Path | None = None):
    """Our plan for make_checkpoint's real-shape preset (seeded tensors, generated on demand)."""
    import sys

    from converter.adapter import load_adapter
    from converter.config import ConversionConfig
    from converter.models import find_model_type
    from converter.plan import ConversionPlan, plan_base, plan_lora
    from converter.split import SplittingSource
    from tests.test_oracle import SeededSource

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_checkpoint import LORA_TARGETS, PRESETS, hf_config, model_shapes, write_adapter

    shapes = model_shapes(hf_config(PRESETS[model_type]))
    family, kind = find_model_type(model_type)
    dims = kind.reference
    source = SplittingSource(SeededSource(shapes))
    config = ConversionConfig(input_ckpt="seeded", ckpt_format="safetensors", model_type=model_type,
                              output_dir="unused", vocab_model_file=TOKENIZER, quantization=quantization,
                              mediapipe_compat=True, lora_ckpt=adapter_dir, lora_rank=8 if adapter_dir else None)
    plan = ConversionPlan(config, family, kind, dims, family.parameters(dims, {}).SerializeToString(),
                          TOKENIZER.read_bytes(), source, plan_base(family, dims, source, quantization))
    if adapter_dir:
        write_adapter(shapes, adapter_dir, 8, 16.0, LORA_TARGETS[model_type], 0, torch.bfloat16)
        plan.adapter = load_adapter(adapter_dir, family, dims, model_type)
        plan.lora = plan_lora(family, dims, plan.adapter, 8, compat=True, peft_scaling=False)
    return plan


def encoded_digests(plan, items) -> dict[str, str]:
    from converter.convert import WRITERS
    from tests.test_oracle import MemorySink

    sink = MemorySink(items)
    for item in items:
        WRITERS[item.encoding](plan, item, sink, lambda n: None)
    return {name: hashlib.sha256(data).hexdigest() for name, data in sink.buffers.items()}


# MediaPipe 0.10.21's outputs at real shapes, digested by scripts/parity.py --record.
RECORDS = {("PHI_2", "int8"): "phi-2-int8-lora8.json", ("PHI_2", "int4"): "phi-2-int4.json",
           ("FALCON_RW_1B", "int8"): "falcon-rw-1b-int8.json", ("FALCON_RW_1B", "int4"): "falcon-rw-1b-int4.json",
           ("STABLELM_4E1T_3B", "int8"): "stablelm-4e1t-3b-int8.json",
           ("STABLELM_4E1T_3B", "int4"): "stablelm-4e1t-3b-int4.json"}
LAYER = 3


@pytest.mark.oracle
@pytest.mark.parametrize("model_type,quantization", sorted(RECORDS))
def test_real_shape_file_matches_mediapipes_output(model_type, quantization):
    """MediaPipe's full output: same flatbuffer region, offsets and size; one layer's tensors and
    the final norm, regenerated from their seeds, hash the same."""
    record = json.loads((ROOT / "fixtures" / "oracle" / RECORDS[model_type, quantization]).read_text())["base"]
    plan = recorded_plan(model_type, quantization)
    assert_layout_matches_record(plan, plan.base, None, record)
    layer = [item for item in plan.base
             if any(f"x_layers_{LAYER}." in s.name or "final_ln" in s.name for s in item.outputs)]
    digests = encoded_digests(plan, layer)
    assert len(digests) > 20
    assert digests == {name: record["tensors"][name]["sha256"] for name in digests}


@pytest.mark.oracle
def test_phi2_lora_matches_mediapipes_encoding_of_its_intended_names(tmp_path):
    """0.10.21's PhiMapper never renames LoRA tensors; with the names it means to give them
    (scripts/oracle_convert.py --rename-lora-bins) its C++ step writes float32 tile4 halves, post
    left first, and reinterprets post's buffers; --mediapipe-compat reproduces every byte."""
    record = json.loads((ROOT / "fixtures" / "oracle" / RECORDS["PHI_2", "int8"]).read_text())["lora"]
    plan = recorded_plan("PHI_2", "int8", tmp_path / "adapter")
    assert_layout_matches_record(plan, plan.lora, 8, record)
    digests = encoded_digests(plan, plan.lora)
    assert len(digests) == 4 * 2 * 32
    assert digests == {name: record["tensors"][name]["sha256"] for name in digests}


def test_falcon_runs_in_litertlm_gpu_as_in_the_reference_runtime(tmp_path):
    """LiteRT-LM's GPU executor (SwiftShader) loads our FALCON_RW_1B file and its greedy text is the
    reference runtime's. (Its shaders for Phi-2 and StableLM fail to compile on this driver:
    WGSL `vec4<f32> + vec4<bool>`, so those two are not run here.)"""
    from click.testing import CliRunner

    from bundler.cli import main as bundle_main
    from harness.generate import Options, generate, load

    from .test_bundler import run_litertlm

    out = convert(save(hf_model("FALCON_RW_1B"), tmp_path / "ckpt", True), "FALCON_RW_1B", tmp_path / "out", "int8")
    bundle = tmp_path / "falcon.litertlm"
    result = CliRunner().invoke(bundle_main, ["--tflite-model", str(out / "model.bin"), "--tokenizer-model",
                                              str(TOKENIZER), "--start-token", "<bos>", "--stop-tokens", "<eos>",
                                              "--output-filename", str(bundle), "--format", "litertlm"])
    assert result.exit_code == 0, result.output
    runtime = run_litertlm(bundle, "one two three", 24)
    ours = generate(load(out / "model.bin"), "one two three", Options(max_tokens=24, top_k=1, temperature=0)).text
    assert runtime["base"] == ours and ours


@pytest.mark.parametrize("model_type,targets", [
    ("FALCON_RW_1B", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),  # fused qkv: merged, then split
    ("STABLELM_4E1T_3B", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
])
def test_adapter_merged_where_the_runtime_takes_no_lora(tmp_path, model_type, targets):
    """Types without runtime LoRA take an adapter merged into the base (--merge-lora --merge-unsupported):
    the reference runtime on the one merged file gives PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    checkpoint = save(hf_model(model_type), tmp_path / "ckpt", False)
    torch.manual_seed(7)
    peft = get_peft_model(hf_model(model_type), LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                           init_lora_weights=False)).eval()
    peft.save_pretrained(str(tmp_path / "adapter"))
    out = convert(checkpoint, model_type, tmp_path / "out", "fp32", "--lora-ckpt", tmp_path / "adapter",
                  "--merge-lora", "--merge-unsupported")
    merged = ReferenceModel(WeightFile(out / "model.bin"))
    for ids in PROMPTS:
        theirs = logits(peft, ids)
        with peft.disable_adapter():
            assert (theirs - logits(peft, ids)).abs().max() > 0.2  # the adapter matters
        torch.testing.assert_close(merged.forward(ids)[0], theirs, atol=1e-4, rtol=0)
