"""`--merge-lora` (and `--merge-unsupported`): adapters made by real `peft` on the tiny Gemma, merged
by us into one base file, run in the reference runtime and compared with PEFT's own forward pass."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from converter import ConversionConfig, ConversionError, convert
from converter.models import gemma
from converter.tflite import WeightFile
from harness.reference import ReferenceModel

from .conftest import TINY, TOKENIZER, base_args, run_convert

IDS = [2, 30, 31, 32, 33, 34, 35]
BOUNDS = {"fp32": 3e-5, "int8": 2e-2}  # fp32: float tolerance; int8: tests/test_harness.py's bound
FLAGS = "--merge-lora --merge-unsupported"


def make_adapter(folder: Path, tweak=None, **config) -> Path:
    """A PEFT adapter with random (non-identity) weights; `tweak(model)` edits it before saving."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM", **config))
    if tweak is not None:
        with torch.no_grad():
            tweak(peft)
    peft.save_pretrained(str(folder))
    return folder


def scale_params(name_part: str, low: float, high: float, add: bool = False):
    """A tweak multiplying every parameter whose name contains `name_part` by random factors
    (adding random values with `add`: Gemma's norm weights start at zero)."""
    def tweak(model):
        for name, parameter in model.named_parameters():
            if name_part in name:
                values = torch.empty_like(parameter).uniform_(low, high)
                parameter.add_(values) if add else parameter.mul_(values)
    return tweak


def peft_model(adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def merged_logits(tmp_path: Path, adapter: Path, quantization: str = "fp32", unsupported: bool = True) -> torch.Tensor:
    result = convert(ConversionConfig(input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B",
                                      output_dir=tmp_path / "out", vocab_model_file=TOKENIZER,
                                      quantization=quantization, lora_ckpt=adapter, merge_lora=True,
                                      merge_unsupported=unsupported))
    assert result.lora_output is None and [p.name for p in (tmp_path / "out").iterdir()] == ["model.tflite"]
    return ReferenceModel(WeightFile(result.output)).forward(IDS)[0]


def base_logits() -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval())


def assert_matches_peft(ours: torch.Tensor, adapter: Path, bound: float = BOUNDS["fp32"]) -> None:
    theirs = logits(peft_model(adapter))
    assert (ours - theirs).abs().max() < bound
    assert (theirs - base_logits()).abs().max() > 0.05  # the adapter does something, and we reproduce it


CASES = {  # name: (LoraConfig arguments, tweak, needs --merge-unsupported)
    "LoRA alpha != r, all-linear": (dict(r=8, lora_alpha=24, target_modules="all-linear"), None, False),
    "rslora with rank/alpha patterns": (dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"],
                                             rank_pattern={"q_proj": 4}, alpha_pattern={"o_proj": 40}), None, False),
    "DoRA": (dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
             scale_params("lora_magnitude_vector", 0.5, 1.5), True),
    "embedding LoRA, tied as PEFT ties it": (
        dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True),
        scale_params("lora_embedding_B", 0.02, 0.05), True),
    "modules_to_save embedding, tied as PEFT ties it": (
        dict(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
        scale_params("modules_to_save", -0.05, 0.05, add=True), True),
    "modules_to_save norms": (dict(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["norm"]),
                              scale_params("modules_to_save", -0.5, 0.5, add=True), True),
}


@pytest.mark.parametrize("case", CASES)
def test_merged_file_computes_what_peft_computes(case, tmp_path):
    config, tweak, unsupported = CASES[case]
    adapter = make_adapter(tmp_path / "adapter", tweak, **config)
    assert_matches_peft(merged_logits(tmp_path, adapter, unsupported=unsupported), adapter)
    if unsupported:  # never merged silently: --merge-lora alone names the part and the flag
        with pytest.raises(ConversionError, match=f"(DoRA|cannot apply this) .*{FLAGS}"):
            merged_logits(tmp_path / "partial", adapter, unsupported=False)


def test_int8_merge_stays_within_the_harness_bound(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", r=8, lora_alpha=24, target_modules="all-linear")
    assert_matches_peft(merged_logits(tmp_path, adapter, "int8"), adapter, BOUNDS["int8"])


UNTIED = {"embedding LoRA": dict(target_modules=["embed_tokens", "q_proj"]),
          "modules_to_save embedding": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])}


@pytest.mark.parametrize("case", UNTIED)
def test_untied_embedding_change_is_refused_because_peft_changes_the_lookup_only(case, tmp_path):
    adapter = make_adapter(tmp_path / "adapter", scale_params("modules_to_save", -0.05, 0.05, add=True), r=8,
                           lora_alpha=16, **UNTIED[case])
    # The reason: PEFT's forward differs from the model whose one tied tensor holds PEFT's merged embedding.
    from transformers import AutoModelForCausalLM

    model = peft_model(adapter)
    forward = logits(model)
    embedding = model.merge_and_unload().get_input_embeddings().weight
    tied = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    with torch.no_grad():
        tied.get_input_embeddings().weight.copy_(embedding)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert (logits(tied) - forward).abs().max() > 1e-3
    with pytest.raises(ConversionError, match="embed_tokens: GEMMA_2B uses one tensor .* ensure_weight_tying"):
        merged_logits(tmp_path, adapter)


def test_already_merged_checkpoint_converts_as_a_plain_base(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", r=8, lora_alpha=24, target_modules="all-linear")
    merged = tmp_path / "merged"
    peft_model(adapter).merge_and_unload().save_pretrained(str(merged))
    result = run_convert(*base_args(merged, tmp_path / "plain", "--quantization", "fp32"))
    assert result.exit_code == 0, result.output
    plain = ReferenceModel(WeightFile(tmp_path / "plain" / "model.bin")).forward(IDS)[0]
    assert_matches_peft(plain, adapter)
    torch.testing.assert_close(plain, merged_logits(tmp_path, adapter), atol=BOUNDS["fp32"], rtol=0)


def test_family_without_mlp_lora_merges_mlp_only_when_asked(tmp_path, monkeypatch):
    """The family data decides what the runtime takes as LoRA: with attention-only LoRA rules, an
    all-linear adapter's MLP parts are refused, then merged with --merge-unsupported."""
    from converter import plan

    attention_only = dataclasses.replace(gemma.FAMILY, lora=gemma.FAMILY.lora[:4])
    monkeypatch.setattr(plan, "find_model_type", lambda name: (attention_only, attention_only.model_type(name)))
    adapter = make_adapter(tmp_path / "adapter", r=8, lora_alpha=24, target_modules="all-linear")
    out = tmp_path / "lora-out"
    result = run_convert(*base_args(TINY, out, "--lora-ckpt", adapter, "--lora-rank", 8))
    assert result.exit_code == 1 and "layer 0 mlp.down_proj: the GEMMA_2B runtime cannot apply this LoRA" in \
        result.stderr and FLAGS in result.stderr, result.stderr
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(ConversionError, match=f"mlp.down_proj.*--merge-lora alone does not merge it; use {FLAGS}"):
        merged_logits(tmp_path / "partial", adapter, unsupported=False)
    assert_matches_peft(merged_logits(tmp_path, adapter), adapter)


def refusal(tmp_path: Path, *args) -> str:
    out = tmp_path / "out"
    result = run_convert(*base_args(TINY, out, *args))
    assert result.exit_code == 1, result.output
    assert not out.exists() or not list(out.iterdir())
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_parts_only_merging_can_apply_are_refused_naming_module_and_flags(tmp_path):
    dora = make_adapter(tmp_path / "dora", r=8, lora_alpha=16, target_modules=["q_proj"], use_dora=True)
    assert "DoRA" in (line := refusal(tmp_path, "--lora-ckpt", dora, "--lora-rank", 8)) and FLAGS in line
    assert FLAGS in refusal(tmp_path, "--lora-ckpt", dora, "--merge-lora")
    embedding = make_adapter(tmp_path / "emb", r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"],
                             ensure_weight_tying=True)
    line = refusal(tmp_path, "--lora-ckpt", embedding, "--lora-rank", 8)
    assert "embed_tokens: the GEMMA_2B runtime cannot apply this embedding LoRA" in line and FLAGS in line
    saved = make_adapter(tmp_path / "mts", r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["norm"])
    line = refusal(tmp_path, "--lora-ckpt", saved, "--merge-lora")
    assert "layer 0 input_layernorm" in line and "modules_to_save" in line and FLAGS in line


def test_check_adapter_and_dry_run_say_what_is_merged(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["norm"])
    check = run_convert("--check-adapter", adapter, "--model-type", "GEMMA_2B", "--input-ckpt", TINY,
                        "--merge-lora", "--merge-unsupported")
    assert check.exit_code == 0, check.output
    assert "merged into 9 base tensors" in check.stdout and "no LoRA file" in check.stdout
    assert "layers.1.self_attn.v_proj.weight" in check.stdout and "LoRA (rank 8, scale 2)" in check.stdout
    assert "norm.weight" in check.stdout and "modules_to_save replacement (whole tensor)" in check.stdout
    dry = run_convert(*base_args(TINY, tmp_path / "out", "--lora-ckpt", adapter, "--merge-lora",
                                 "--merge-unsupported", "--dry-run"))
    assert dry.exit_code == 0, dry.output
    assert "merging" in dry.stdout and "model.layers.0.self_attn.q_proj.weight + LoRA" in dry.stdout
    assert "model.norm.weight + modules_to_save replacement" in dry.stdout
    assert "w_prime" not in dry.stdout and not (tmp_path / "out").exists()


def test_base_model_name_is_checked_against_a_local_base_and_only_noted_otherwise(tmp_path, tiny):
    adapter = make_adapter(tmp_path / "adapter", r=8, lora_alpha=16, target_modules=["q_proj"])
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**json.loads((TINY / "config.json").read_text()),
                                                   "num_hidden_layers": 4}))
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    line = refusal(tmp_path, "--lora-ckpt", adapter, "--lora-rank", 8)
    assert str(other) in line and "num_layers=4" in line and "num_layers=2" in line
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "google/gemma-2b-it"}))
    (tiny / "config.json").write_text(json.dumps({**json.loads((tiny / "config.json").read_text()),
                                                  "_name_or_path": "google/gemma-2b"}))
    result = run_convert(*base_args(tiny, tmp_path / "ok", "--lora-ckpt", adapter, "--merge-lora"))
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "'google/gemma-2b-it'" in result.stderr and "'google/gemma-2b'" in result.stderr
