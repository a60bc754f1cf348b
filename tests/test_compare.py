"""`lora-run --compare`: small differences for right conversions, and the first wrong layer for broken ones."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from converter import ConversionConfig, convert
from converter.tflite import WeightFile
from harness.cli import main
from harness.compare import TOLERANCES, compare, load_transformers, tolerance_for
from harness.generate import load, prompt_ids

from .conftest import TINY, TINY_LORA, TOKENIZER

PROMPT = "one two three four five six seven"


def converted(out, quantization: str, lora_scaling: str | None = None):
    result = convert(ConversionConfig(
        input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B", output_dir=out, vocab_model_file=TOKENIZER,
        quantization=quantization, lora_ckpt=TINY_LORA, lora_rank=8, lora_scaling=lora_scaling))
    return result.output, result.lora_output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return {q: converted(out / q, q) for q in ("fp32", "int8")}


@pytest.fixture(scope="module")
def hf():
    return {"base": load_transformers(TINY), "lora": load_transformers(TINY, TINY_LORA)}


def report(hf, base, lora=None, encoding="fp32"):
    loaded = load(base, lora)
    return compare(loaded, hf["lora" if lora else "base"], prompt_ids(loaded, PROMPT), encoding,
                   tolerance_for(encoding, lora is not None))


def test_fp32_conversion_differs_by_float_rounding_only(files, hf):
    result = report(hf, files["fp32"][0])
    assert [row.name for row in result.rows] == ["embeddings", "layer 0", "layer 1", "final norm", "logits"]
    assert all(row.max_abs < 1e-5 and row.relative < 1e-6 for row in result.rows), result.rows
    assert result.ours_next == result.theirs_next and result.first_bad is None


def test_lora_differences_are_those_of_fp16_halves(files, hf):
    """LoRA halves are stored as fp16 (relative rounding 2^-11), so differences stay near that size."""
    result = report(hf, *files["fp32"])
    assert all(row.relative < 5e-3 for row in result.rows), result.rows
    assert result.ours_next == result.theirs_next and result.first_bad is None


@pytest.mark.parametrize("lora", [False, True])
def test_int8_differences_are_bounded(files, hf, lora):
    """Per-row int8 rounds each weight by at most scale/2 (under 0.4% of the row's largest)."""
    base, adapter = files["int8"]
    result = report(hf, base, adapter if lora else None, "int8")
    assert all(row.relative < 0.03 for row in result.rows), result.rows
    assert result.rows[0].max_abs > 0  # quantization is visible in the embeddings: the check compares something
    assert result.ours_next == result.theirs_next and result.first_bad is None


def test_altered_layer_1_weights_are_pointed_at(files, hf, tmp_path):
    broken = tmp_path / "broken.bin"
    shutil.copy(files["int8"][0], broken)
    entry = WeightFile(broken).tensors["params.lm.transformer.x_layers_1.ff_layer.ffn_layer2.w"]
    data = np.memmap(broken, dtype=np.uint8, mode="r+", offset=entry.offset, shape=(entry.nbytes,))
    data[:] = np.random.default_rng(0).permutation(data)  # same values, wrong places
    data.flush()
    del data
    result = report(hf, broken, encoding="int8")
    assert result.first_bad is not None and result.first_bad.name == "layer 1", result.rows
    assert result.rows[1].relative < TOLERANCES["int8"] < 0.2 < result.rows[2].relative


def test_lora_converted_without_alpha_is_wrong_from_layer_0(files, hf, tmp_path):
    """The fixture adapter has alpha 32, r 8: storing it raw (no alpha / r) breaks every layer."""
    base, raw_lora = converted(tmp_path, "fp32", lora_scaling="raw")
    result = report(hf, base, raw_lora)
    assert result.rows[0].relative == 0  # embeddings carry no LoRA
    assert result.first_bad is not None and result.first_bad.name == "layer 0", result.rows


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compare_cli_prints_the_table_and_verdict(files):
    base, adapter = files["int8"]
    result = run("--model", base, "--lora", adapter, "--prompt", PROMPT, "--compare",
                 "--hf-model", TINY, "--hf-lora", TINY_LORA)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["max|diff|", "mean|diff|", "relative"]
    assert [line.split()[0] for line in lines[2:7]] == ["embeddings", "layer", "layer", "final", "logits"]
    assert ": agree" in lines[7]
    assert lines[8].startswith("all rows within the tolerance for int8 + fp16 LoRA 5e-02")


def test_compare_cli_takes_a_task_bundle(files, tmp_path):
    from bundler.cli import main as bundle_main

    bundle = tmp_path / "tiny.task"
    made = CliRunner().invoke(bundle_main, ["--tflite-model", str(files["int8"][0]), "--tokenizer-model", str(TOKENIZER),
                                            "--start-token", "<bos>", "--stop-tokens", "<eos>",
                                            "--output-filename", str(bundle)])
    assert made.exit_code == 0, made.output
    result = run("--model", bundle, "--prompt", PROMPT, "--compare", "--hf-model", TINY)
    assert result.exit_code == 0, result.output
    assert "all rows within the tolerance for int8 5e-02" in result.stdout


def test_compare_cli_errors_are_one_line(files, monkeypatch, tmp_path):
    base, adapter = files["fp32"]
    (tmp_path / "config.json").write_text("{}")
    cases = [
        (["--model", base, "--prompt", "x", "--compare"], "error: --compare needs --hf-model DIR"),
        (["--model", base, "--lora", adapter, "--prompt", "x", "--compare", "--hf-model", TINY],
         "error: --compare compares like with like"),
        (["--model", base, "--prompt", "x", "--compare", "--hf-model", TINY / "nowhere"],
         f"error: --hf-model {TINY / 'nowhere'}: no config.json there"),
        (["--model", base, "--prompt", "x", "--compare", "--hf-model", TINY_LORA],
         f"error: --hf-model {TINY_LORA}: no config.json there"),
        (["--model", base, "--lora", adapter, "--prompt", "x", "--compare", "--hf-model", TINY, "--hf-lora", TINY],
         f"error: --hf-lora {TINY}: no adapter_config.json there"),
        (["--model", base, "--prompt", "x", "--compare", "--hf-model", tmp_path],
         f"error: --hf-model {tmp_path}: transformers cannot load it"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 1 and result.stderr.startswith(message), (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    result = run("--model", base, "--prompt", "x", "--compare", "--hf-model", TINY)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --compare needs transformers and peft: pip install 'lora-convert[compare]'"
