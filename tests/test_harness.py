"""The reference runtime agrees with transformers + PEFT, and LiteRT-LM's GPU backend agrees with it."""
from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_is_the_float32_product_of_the_stored_weights(bits, monkeypatch):
    """Integer digits of the activations lose nothing float32 would keep: the error from the exact
    (float64) product of the stored weights is no larger than a float32 matmul's."""
    from harness import linear
    from harness.linear import IntMmProduct, QuantizedLinear, exact_product

    generator = torch.Generator().manual_seed(bits)
    limit = 2 ** (bits - 1)
    values = torch.randint(-limit, limit, (96, 256), generator=generator, dtype=torch.int8)
    scale = torch.rand(96, generator=generator) / 100
    x = torch.randn(5, 256, generator=generator) * torch.logspace(-3, 2, 256)  # wide range, as hidden states
    exact = x.double() @ (values.double() * scale.double()[:, None]).T
    float32 = x @ (values.float() * scale[:, None]).T
    for product in {exact_product(), IntMmProduct}:  # oneDNN's kernels where this CPU has exact ones
        monkeypatch.setattr(linear, "PRODUCT", product)
        ours = QuantizedLinear(values, scale)(x)
        assert (ours.double() - exact).abs().max() <= (float32.double() - exact).abs().max(), product


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_rows_are_read_from_the_stored_bytes(bits):
    """Looked-up rows come from the file's tile4 bytes (no second copy of the embedding): they are
    the rows of the matrix the converter's own decoder (`dequantize_tiled`) gives."""
    from converter import quantize
    from harness.linear import StoredRows

    weights = torch.randn(24, 16, generator=torch.Generator().manual_seed(bits))
    stored = quantize.quantize_tiled(weights, bits)
    dequantized = quantize.dequantize_tiled(stored.tiled.flatten(), stored.scale, bits, 24, 16)
    rows = StoredRows(stored.tiled.flatten().numpy(), stored.scale, bits, 24, 16)
    ids = torch.tensor([23, 0, 5, 6, 7, 5])  # every position in a tile (o % 4), and a repeat
    assert torch.equal(rows(ids), dequantized[ids])


def test_onednn_is_used_only_where_its_int8_products_are_exact():
    """Without VNNI oneDNN sums byte pairs in saturating int16: its products of large 8-bit digits are
    then wrong, and the probe must pick 7-bit digits (pairs stay below 2^15) where those are exact,
    else torch._int_mm (which is exact everywhere)."""
    from harness.linear import IntMmProduct, OneDnnProduct, SevenBitOneDnnProduct, exact_product

    values = torch.full((8, 64), 127, dtype=torch.int8)
    values[4:] = -128

    def exact_for(product, digit: int) -> bool:
        digits = torch.tensor([[digit] * 64, [-digit] * 64], dtype=torch.float32)
        return torch.equal(product(values, torch.ones(8))(digits).double(), digits.double() @ values.double().T)

    assert exact_for(IntMmProduct, 127)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    if exact_for(OneDnnProduct, 127):
        assert exact_product() is OneDnnProduct
    else:
        assert exact_product() is (SevenBitOneDnnProduct if exact_for(SevenBitOneDnnProduct, 63) else IntMmProduct)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_integer_weights_give_the_logits_of_dequantized_weights(files, quantization, monkeypatch):
    """Keeping int8/int4 as integers computes what dequantizing every weight to float32 computes."""
    from harness import reference
    from harness.linear import FloatLinear

    kept = ours(files, quantization, lora=True)
    monkeypatch.setattr(reference, "load_linear", lambda weights, name, rows, cols, lookup=False:
                        FloatLinear(weights.matrix(name, rows, cols)))
    dequantized = ours(files, quantization, lora=True)
    for ids in PROMPTS:
        torch.testing.assert_close(kept.forward(ids)[0], dequantized.forward(ids)[0], atol=1e-5, rtol=0)


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
