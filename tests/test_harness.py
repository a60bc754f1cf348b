"""The reference runtime agrees with transformers + PEFT, and LiteRT-LM's GPU backend agrees with it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converter import ConversionConfig, convert
from converter.tflite import WeightFile
from harness.generate import Options, generate, load
from harness.reference import ReferenceModel

from .conftest import TINY, TINY_LORA, TOKENIZER

PROMPTS = [[2, 10, 20, 30, 40, 50], [2, 300, 7, 99], [2, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny Gemma + adapter (alpha 32, r 8) converted in each encoding: {quantization: (base, lora)}."""
    out = tmp_path_factory.mktemp("harness")
    result = {}
    for quantization in ("fp32", "fp16", "int8", "int4"):
        converted = convert(ConversionConfig(
            input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B", output_dir=out / quantization,
            vocab_model_file=TOKENIZER, quantization=quantization, lora_ckpt=TINY_LORA, lora_rank=8))
        result[quantization] = (converted.output, converted.lora_output)
    return result


@pytest.fixture(scope="module")
def hf_models():
    """transformers' base model and PEFT's model with the LoRA halves rounded to fp16 as stored."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32),
                                     str(TINY_LORA)).eval()
    assert peft.peft_config["default"].lora_alpha != peft.peft_config["default"].r  # alpha must matter
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:  # we store B * alpha / r in fp16; PEFT scales after: round the same product
                scale = peft.peft_config["default"].lora_alpha / peft.peft_config["default"].r
                parameter.copy_((parameter * scale).half().float() / scale)
            elif "lora_A" in name:
                parameter.copy_(parameter.half().float())
    return base, peft


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def ours(files, quantization: str, lora: bool = False) -> ReferenceModel:
    base, adapter = files[quantization]
    return ReferenceModel(WeightFile(base), WeightFile(adapter) if lora else None)


@pytest.mark.parametrize("ids", PROMPTS)
def test_fp32_matches_transformers_and_peft(files, hf_models, ids):
    base, peft = hf_models
    ours_base, _ = ours(files, "fp32").forward(ids)
    ours_lora, _ = ours(files, "fp32", lora=True).forward(ids)
    theirs_base, theirs_lora = hf_logits(base, ids), hf_logits(peft, ids)
    torch.testing.assert_close(ours_base, theirs_base, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours_lora, theirs_lora, atol=2e-5, rtol=0)
    # The adapter moves the logits exactly as PEFT's does, and by a lot (a no-op LoRA would fail).
    torch.testing.assert_close(ours_lora - ours_base, theirs_lora - theirs_base, atol=4e-5, rtol=0)
    assert (theirs_lora - theirs_base).abs().max() > 0.5


# Largest |logit| difference from transformers' fp32 model allowed per encoding (logits reach ~1.5).
BOUNDS = {"fp16": 2e-3, "int8": 2e-2, "int4": 0.4}


@pytest.mark.parametrize("quantization", BOUNDS)
def test_lower_precision_stays_within_bounds_and_greedy_tokens(files, hf_models, quantization):
    base, peft = hf_models
    for ids in PROMPTS:
        for lora, reference in ((False, base), (True, peft)):
            logits, _ = ours(files, quantization, lora).forward(ids)
            assert (logits - hf_logits(reference, ids)).abs().max() < BOUNDS[quantization], (quantization, lora, ids)
    if quantization == "int4":
        return  # a 64-wide random model at 4 bits: bounded logits, but argmax near-ties flip
    loaded = load(files[quantization][0])
    for prompt in ("one two three", "red green blue", "the cat"):
        sequence = [2] + loaded.tokenizer.encode(prompt)
        expected = []
        for _ in range(12):
            token = int(hf_logits(base, sequence)[-1].argmax())
            if token == 1:
                break
            expected.append(token)
            sequence.append(token)
        got = generate(loaded, prompt, Options(max_tokens=len(sequence), top_k=1)).ids
        assert got == expected, (quantization, prompt)


def test_kv_cache_decoding_equals_full_forward(files):
    model = ours(files, "int8", lora=True)
    ids = [2, 11, 12, 13, 14, 15]
    full, _ = model.forward(ids)
    first, cache = model.forward(ids[:3])
    rest, _ = model.forward(ids[3:], cache)
    torch.testing.assert_close(torch.cat([first, rest]), full, atol=1e-5, rtol=0)
    last, _ = model.forward(ids, last_only=True)  # what generation asks for the prompt
    torch.testing.assert_close(last, full[-1:], atol=1e-5, rtol=0)


def test_lora_run_cli_streams_and_reports_speed(files):
    from click.testing import CliRunner

    from harness.cli import main

    base, adapter = files["int8"]
    result = CliRunner().invoke(main, ["--model", str(base), "--lora", str(adapter), "--prompt", "one two three",
                                       "--max-tokens", "32", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    loaded = load(base, adapter)
    assert result.stdout.strip() == generate(loaded, "one two three", Options(max_tokens=32, top_k=1)).text.strip()
    assert "tokens/s" in result.stderr
    missing = CliRunner().invoke(main, ["--model", "nowhere.bin", "--prompt", "x"])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: --model nowhere.bin")


def assert_litertlm_matches_reference(base: Path, adapter: Path, bundle: Path) -> None:
    """Bundle `base` as `.litertlm`; LiteRT-LM's GPU greedy text, without and with the LoRA file
    `adapter`, is the reference runtime's, and the adapter changes it."""
    from click.testing import CliRunner

    from bundler.cli import main as bundle_main

    from .test_bundler import run_litertlm

    result = CliRunner().invoke(bundle_main, ["--tflite-model", str(base), "--tokenizer-model", str(TOKENIZER),
                                              "--start-token", "<bos>", "--stop-tokens", "<eos>",
                                              "--output-filename", str(bundle), "--format", "litertlm"])
    assert result.exit_code == 0, result.output
    runtime = run_litertlm(bundle, "one two three", 24, adapter)
    options = Options(max_tokens=24, top_k=1, temperature=0)
    assert runtime["base"] == generate(load(base), "one two three", options).text
    assert runtime["lora"] == generate(load(base, adapter), "one two three", options).text
    assert runtime["base"] != runtime["lora"]


@pytest.mark.runtime
def test_litertlm_gpu_output_equals_the_reference_runtime(files, tmp_path):
    """Greedy text from LiteRT-LM's GPU executor (SwiftShader) is the reference runtime's, with
    and without our LoRA (alpha folded, plain o_proj encoding)."""
    base, adapter = files["int8"]
    assert_litertlm_matches_reference(Path(base), Path(adapter), tmp_path / "tiny.litertlm")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_integer_weights_give_the_logits_of_dequantized_weights(files, quantization, monkeypatch):
    """Keeping int8/int4 as integers computes what dequantizing every weight to float32 computes."""
    from harness import reference
    from harness.linear import FloatLinear

    kept = ours(files, quantization, lora=True)
    monkeypatch.setattr(reference, "load_linear", lambda weights, name, rows, cols:
                        FloatLinear(weights.matrix(name, rows, cols)))
    dequantized = ours(files, quantization, lora=True)
    for ids in PROMPTS:
        torch.testing.assert_close(kept.forward(ids)[0], dequantized.forward(ids)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_matrices_are_used_where_they_lie_in_the_file(files, quantization):
    """Loading copies no quantized weights: each matrix is a view of the file's memory map, whose
    rows are the converter's own decoding of those bytes."""
    from converter import quantize
    from harness.linear import load_linear
    from harness.tiled import TiledLinear

    weights = WeightFile(files[quantization][0])
    name = "params.lm.transformer.x_layers_1.ff_layer.ffn_layer2.w"
    loaded = load_linear(weights, name, 64, 256)
    assert isinstance(loaded, TiledLinear) and isinstance(loaded.data.base, np.memmap)
    scale = torch.from_numpy(weights.raw(f"{name}_quantized_scale").copy()).view(torch.float32)
    decoded = quantize.dequantize_tiled(torch.from_numpy(weights.raw(name).copy()), scale, loaded.bits, 64, 256)
    assert torch.equal(loaded.rows(torch.arange(64)), decoded)


def test_truncated_quantized_tensor_is_one_clear_error(files, tmp_path):
    from converter.errors import ConversionError
    from harness.linear import load_linear

    weights = WeightFile(files["int8"][0])
    with pytest.raises(ConversionError, match=r"tensor params.lm.softmax.logits_ffn.w has 32768 bytes .*\[512, 128\]"):
        load_linear(weights, "params.lm.softmax.logits_ffn.w", 512, 128)


def test_small_work_runs_on_one_thread_and_restores_the_count():
    from harness.linear import SMALL_WORK, threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # with one thread already, nothing below could fail
    try:
        with threads_for(SMALL_WORK - 1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads_for(SMALL_WORK):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
