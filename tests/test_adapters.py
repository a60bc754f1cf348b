"""Adapters as people train them (real `peft` on the tiny Gemma), each proven against PEFT's forward."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter import ConversionConfig, ConversionError, convert
from converter.tflite import WeightFile
from harness.reference import ReferenceModel

from .conftest import TINY, TOKENIZER, run_convert

IDS = [2, 30, 31, 32, 33, 34, 35]


def make_adapter(folder: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    lora = LoraConfig(lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM", **config)
    get_peft_model(model, lora).save_pretrained(str(folder))
    return folder


def peft_logits(adapter: Path) -> torch.Tensor:
    """PEFT's logits with each LoRA half rounded the way it is stored (A, and B * scale, in fp16)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32),
                                      str(adapter)).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                scale = module.scaling["default"]
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(a.half().float())
                b.copy_((b * scale).half().float() / scale)
        return model(torch.tensor([IDS])).logits[0]


def our_logits(tmp_path: Path, adapter: Path, rank: int = 8) -> tuple[torch.Tensor, WeightFile]:
    result = convert(ConversionConfig(input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B",
                                      output_dir=tmp_path / "out", vocab_model_file=TOKENIZER, quantization="fp32",
                                      lora_ckpt=adapter, lora_rank=rank))
    lora = WeightFile(result.lora_output)
    logits, _ = ReferenceModel(WeightFile(result.output), lora).forward(IDS)
    return logits, lora


CASES = {
    "alpha != r": dict(r=8, lora_alpha=24, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "q/v only (old PEFT default)": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all-linear": dict(r=8, lora_alpha=8, target_modules="all-linear"),
    "rank/alpha patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 64}),
    "only o_proj": dict(r=8, lora_alpha=16, target_modules=["o_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_adapter_agrees_with_peft(case, tmp_path):
    adapter = make_adapter(tmp_path / "adapter", **CASES[case])
    ours, lora = our_logits(tmp_path, adapter)
    theirs = peft_logits(adapter)
    torch.testing.assert_close(ours, theirs, atol=3e-5, rtol=0)
    base, _ = ReferenceModel(WeightFile(tmp_path / "out" / "model.tflite")).forward(IDS)
    assert (theirs - base).abs().max() > 0.05  # the adapter does something, and we reproduce it
    names = list(lora.tensors)
    assert sum(".w_prime_" in n for n in names) >= 16  # q/k/v/o always present (zeros where not trained)
    if case == "all-linear":
        assert any("ffn_layer1_gate.w_prime_left" in n for n in names)
        assert any("ffn_layer2.w_prime_right" in n for n in names)


def test_prefixes_and_bf16_keys_normalize(tmp_path):
    adapter = make_adapter(tmp_path / "peft", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    _, reference = our_logits(tmp_path / "a", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    save_file({k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
               for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    _, lora = our_logits(tmp_path / "b", renamed)
    for name in reference.tensors:
        assert bytes(lora.raw(name)) == bytes(reference.raw(name)), name
    bare = tmp_path / "bare.safetensors"  # a bare file without adapter_config.json: no alpha, raw scale
    save_file({k: v.bfloat16() for k, v in tensors.items()}, str(bare))
    _, lora = our_logits(tmp_path / "c", bare)
    name = "params.lm.transformer.x_layers_0.self_attention.q.w_prime_right"
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(lora.matrix(name, 64, 8), b.bfloat16().float().half().float())


def test_qlora_trained_adapter_is_a_normal_adapter(tmp_path):
    """QLoRA trains on a 4-bit base but saves an ordinary fp adapter; its config says so only in passing."""
    adapter = make_adapter(tmp_path / "qlora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/gemma-2b-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ours, _ = our_logits(tmp_path, adapter)
    torch.testing.assert_close(ours, peft_logits(adapter), atol=3e-5, rtol=0)


def refusal(tmp_path: Path, adapter: Path, *extra) -> str:
    out = tmp_path / "out"
    result = run_convert("--model-type", "GEMMA_2B", "--input-ckpt", TINY, "--vocab-model-file", TOKENIZER,
                         "--output-dir", out, "--lora-ckpt", adapter, "--quiet", *extra)
    assert result.exit_code == 1, result.output
    assert not out.exists() or not list(out.iterdir())
    return result.stderr.strip()


def test_refusals(tmp_path):
    dora = make_adapter(tmp_path / "dora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True)
    assert "DoRA" in (line := refusal(tmp_path, dora, "--lora-rank", 8)) and "--merge-lora --merge-unsupported" in line
    plain = make_adapter(tmp_path / "plain", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    assert "--max-rank 4" in refusal(tmp_path, plain, "--lora-rank", 8, "--max-rank", 4)
    assert "--max-adapter-mb 0.001" in refusal(tmp_path, plain, "--lora-rank", 8, "--max-adapter-mb", 0.001)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "model_type": "llama"}))  # Workers-AI style
    assert "model_type 'llama'" in refusal(tmp_path, plain, "--lora-rank", 8)
    (plain / "adapter_config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    result = run_convert("--check-adapter", plain, "--model-type", "GEMMA_2B", "--input-ckpt", TINY)
    assert result.exit_code == 0 and "missing: written as zeros" in result.stdout and "scale 2" in result.stdout
    no_lora = run_convert("--check-adapter", plain, "--model-type", "GEMMA_7B")  # MediaPipe takes no 7B LoRA
    assert no_lora.exit_code == 1 and "LoRA is not supported for GEMMA_7B" in no_lora.output
    assert "Traceback" not in no_lora.output


def test_rank_pattern_pads_smaller_modules_exactly(tmp_path):
    adapter = make_adapter(tmp_path / "pattern", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           rank_pattern={"q_proj": 4})
    _, lora = our_logits(tmp_path, adapter)
    left = lora.matrix("params.lm.transformer.x_layers_1.self_attention.q.w_prime_left", 8, 64)
    assert left[:4].any() and not left[4:].any()
    with pytest.raises(ConversionError, match="is below the adapter's rank 8"):
        our_logits(tmp_path / "low", adapter, rank=4)
