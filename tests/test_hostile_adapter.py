"""Hostile and unusual PEFT adapters: every bad `adapter_config.json` value, duplicate or lying
tensors, PEFT variants that are not plain LoRA, NaN adapters caught before anything is written,
the --lora-rank default, and real adapters (Phi-2 modules_to_save, PiSSA converted, alpha 0)
proven against PEFT's own forward."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter import ConversionError
from converter.tflite import WeightFile
from harness.reference import ReferenceModel

from .conftest import TINY, TOKENIZER, base_args, run_convert
from .test_adapters import make_adapter, our_logits, peft_logits

PREFIX = "base_model.model.model.layers."
Q_A, Q_B = PREFIX + "0.self_attn.q_proj.lora_A.weight", PREFIX + "0.self_attn.q_proj.lora_B.weight"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def refused(tmp_path: Path, lora: Path, *extra) -> str:
    """The one error line of a conversion with `lora`; checks exit 1, no traceback, no output and
    the adapter's bytes unchanged."""
    before = digest(lora) if lora.is_dir() else None
    out = tmp_path / "out"
    result = run_convert(*base_args(TINY, out, "--lora-ckpt", lora, *extra))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists() or not list(out.iterdir())
    if before is not None:
        assert digest(lora) == before
    return lines[0]


def converted(tmp_path: Path, lora: Path, *extra, name: str = "out"):
    result = run_convert(*base_args(TINY, tmp_path / name, "--lora-ckpt", lora, *extra))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def edit_config(lora: Path, **changes) -> None:
    config = json.loads((lora / "adapter_config.json").read_text())
    config.update(changes)
    (lora / "adapter_config.json").write_text(json.dumps(config))  # NaN/Infinity as Python's json writes them


def drop_config_key(lora: Path, key: str) -> None:
    config = json.loads((lora / "adapter_config.json").read_text())
    del config[key]
    (lora / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(lora: Path, edit) -> None:
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(lora / "adapter_model.safetensors"))


BAD_VALUES = {  # adapter_config.json key: bad values
    "r": [0, -8, "8", 8.0, True, [8], 10**400],
    "lora_alpha": [None, "16", float("nan"), float("inf"), -float("inf"), [16], {"a": 1}, 10**400, -10**400],
    "rank_pattern": [[4], "q_proj", {"q_proj": "4"}, {"q_proj": 0}, {"q_proj": None}, {"(": 4}, {"q_proj[": 4}],
    "alpha_pattern": [[16], {"v_proj": float("nan")}, {"v_proj": None}, {"v_proj": "64"}, {"*": 8}],
    "target_modules": [5, [1, 2], {"q_proj": True}],
    "use_rslora": ["yes", 1],
    "use_dora": ["false", 0.0],
    "ensure_weight_tying": ["true"],
    "base_model_name_or_path": [5, ["google/gemma-2b"], {"path": "x"}],
    "model_type": [["gemma"], 3],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, values in BAD_VALUES.items() for v in values])
def test_bad_config_value_is_one_line_naming_file_and_key(key, value, tiny_lora, tmp_path):
    edit_config(tiny_lora, **{key: value})
    line = refused(tmp_path, tiny_lora)
    assert "adapter_config.json" in line and key in line, line
    check = run_convert("--check-adapter", tiny_lora, "--model-type", "GEMMA_2B", "--input-ckpt", TINY)
    assert check.exit_code == 1 and check.stderr.strip() == line, check.output


@pytest.mark.parametrize("write", [b"{", b"", b"\xff\xfe{}", b"[1, 2]", b'"r"', b"null", b'{"r": 8, "r": }'])
def test_unreadable_config_is_an_error_not_ignored(write, tiny_lora, tmp_path):
    (tiny_lora / "adapter_config.json").write_bytes(write)
    assert "adapter_config.json" in refused(tmp_path, tiny_lora)


def test_config_that_is_a_folder_fifo_or_dangling_link_is_an_error(tiny_lora, tmp_path):
    config = tiny_lora / "adapter_config.json"
    config.unlink()
    config.mkdir()
    assert "adapter_config.json" in refused(tmp_path, tiny_lora)
    config.rmdir()
    config.symlink_to(tmp_path / "gone.json")
    assert "adapter_config.json" in refused(tmp_path, tiny_lora)
    config.unlink()
    os.mkfifo(config)  # reading it would block forever
    assert "adapter_config.json: not a regular file" in refused(tmp_path, tiny_lora)


def test_bare_file_reads_its_siblings_config(tiny_lora, tmp_path):
    (tiny_lora / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json" in refused(tmp_path, tiny_lora / "adapter_model.safetensors")


VARIANTS = {  # key: value, words
    "peft_type LOHA": ({"peft_type": "LOHA"}, ["peft_type", "LOHA", "only LoRA"]),
    "peft_type IA3": ({"peft_type": "IA3"}, ["peft_type", "IA3"]),
    "peft_type ADALORA": ({"peft_type": "ADALORA"}, ["peft_type", "ADALORA"]),
    "activated LoRA": ({"alora_invocation_tokens": [5, 6]}, ["alora_invocation_tokens", "every token"]),
    "lora_bias": ({"lora_bias": True}, ["lora_bias", "bias"]),
    "layer replication": ({"layer_replication": [[0, 2], [1, 2]]}, ["layer_replication", "more layers"]),
    "QA-LoRA": ({"use_qalora": True}, ["use_qalora", "pooled"]),
    "trainable tokens": ({"trainable_token_indices": [3, 4]}, ["trainable_token_indices"]),
    "target_parameters": ({"target_parameters": ["mlp.experts.down_proj"]}, ["target_parameters"]),
    "KaSA": ({"kasa_config": {"r": 8}}, ["kasa_config"]),
    **{f"init {init}": ({"init_lora_weights": init}, ["init_lora_weights", init, "residual",
                                                      "path_initial_model_for_weight_conversion"])
       for init in ("pissa", "pissa_niter_16", "olora", "corda", "loftq", "lora_ga")},
}


@pytest.mark.parametrize("case", VARIANTS)
def test_peft_variants_that_are_not_plain_lora_are_refused_with_the_reason(case, tiny_lora, tmp_path):
    changes, words = VARIANTS[case]
    edit_config(tiny_lora, **changes)
    line = refused(tmp_path, tiny_lora)
    assert all(word in line for word in words), line
    assert "adapter_config.json" in line
    assert "adapter_config.json" in refused(tmp_path, tiny_lora, "--merge-lora", "--merge-unsupported")


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_leave_the_base_alone_convert(init, tiny_lora, tmp_path):
    edit_config(tiny_lora, init_lora_weights=init, velora_config=None, alora_invocation_tokens=[], peft_type="LORA")
    converted(tmp_path, tiny_lora)


def test_lora_b_bias_tensor_is_refused_even_without_the_config_flag(tiny_lora, tmp_path):
    edit_tensors(tiny_lora, lambda t: t.update({PREFIX + "0.self_attn.q_proj.lora_B.bias": torch.zeros(64)}))
    line = refused(tmp_path, tiny_lora)
    assert "q_proj.lora_B.bias" in line and "lora_bias" in line


@pytest.mark.parametrize("duplicate", [Q_B.replace("lora_B.weight", "lora_B.default.weight"),
                                       Q_B.removeprefix("base_model.model."),
                                       "model." + Q_B.removeprefix("base_model.model.")])
def test_duplicate_keys_are_refused_naming_both(duplicate, tiny_lora, tmp_path):
    edit_tensors(tiny_lora, lambda t: t.update({duplicate: torch.ones_like(t[Q_B])}))
    line = refused(tmp_path, tiny_lora)
    assert Q_B in line and duplicate in line and "two names" in line


LIES = {  # edit, words
    "rank_pattern says 4, tensors 8": (lambda lora: edit_config(lora, rank_pattern={"q_proj": 4}),
                                       ["layer 0 self_attn.q_proj", "r=4", "rank 8"]),
    "A rank 8, B rank 4": (lambda lora: edit_tensors(lora, lambda t: t.update({Q_B: torch.ones(64, 4)})),
                           ["q_proj", "[8, 64]", "[64, 4]"]),
    "rank 0": (lambda lora: (drop_config_key(lora, "r"), edit_tensors(
        lora, lambda t: t.update({Q_A: torch.ones(0, 64), Q_B: torch.ones(64, 0)}))), ["q_proj", "rank 0"]),
    "A of three dimensions": (lambda lora: edit_tensors(lora, lambda t: t.update({Q_A: torch.ones(8, 64, 1)})),
                              ["q_proj.lora_A", "[8, 64, 1]"]),
}


@pytest.mark.parametrize("case", LIES)
def test_shapes_that_contradict_the_rank_are_refused(case, tiny_lora, tmp_path):
    edit, words = LIES[case]
    edit(tiny_lora)
    line = refused(tmp_path, tiny_lora)
    assert all(word in line for word in words), line


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", [Q_A, PREFIX + "1.self_attn.o_proj.lora_B.weight"])
def test_non_finite_adapter_is_refused_by_check_adapter_and_before_writing(key, value, tiny_lora, tmp_path):
    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[-1] = value
    edit_tensors(tiny_lora, poison)
    check = run_convert("--check-adapter", tiny_lora, "--model-type", "GEMMA_2B", "--input-ckpt", TINY)
    assert check.exit_code == 1 and key in check.stderr and "NaN or Inf" in check.stderr, check.output
    assert key in refused(tmp_path, tiny_lora)
    assert key in refused(tmp_path, tiny_lora, "--merge-lora")


def test_alpha_so_large_that_the_stored_values_overflow_is_refused(tiny_lora, tmp_path):
    edit_config(tiny_lora, lora_alpha=1e30)
    line = refused(tmp_path, tiny_lora)
    assert "lora_B" in line and "fp16" in line and "lora_alpha" in line
    edit_config(tiny_lora, lora_alpha=1e300)
    line = refused(tmp_path, tiny_lora, "--merge-lora")
    assert "lora_B" in line and "fp32" in line and "lora_alpha" in line
    edit_config(tiny_lora, lora_alpha=400)  # large but representable: converts
    converted(tmp_path, tiny_lora)


def lora_b_values(lora_file: Path) -> torch.Tensor:
    weights = WeightFile(lora_file)
    return torch.cat([weights.matrix(name, 64, 8).reshape(-1) for name in weights.tensors
                      if name.endswith("self_attention.q.w_prime_right")])


def test_alpha_zero_writes_scale_zero_like_peft_with_a_warning(tiny_lora, tmp_path):
    edit_config(tiny_lora, lora_alpha=0)
    result = converted(tmp_path, tiny_lora)
    assert "lora_alpha is 0" in result.stderr and "change nothing" in result.stderr
    assert not lora_b_values(tmp_path / "out" / "lora.tflite").any()  # PEFT's scale 0, not 1
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32),
                                      str(tiny_lora))
    assert {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)} == {0.0}


def test_untrained_adapter_and_missing_targets_convert_with_warnings(tiny_lora, tmp_path):
    edit_tensors(tiny_lora, lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items() if "lora_B" in k}))
    edit_config(tiny_lora, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1"])
    result = converted(tmp_path, tiny_lora)
    assert "every LoRA module has an all-zero lora_A or lora_B" in result.stderr
    assert "target_modules names out_proj, fc1, which GEMMA_2B does not have" in result.stderr
    check = run_convert("--check-adapter", tiny_lora, "--model-type", "GEMMA_2B", "--input-ckpt", TINY)
    assert check.exit_code == 0 and "out_proj" in check.stderr and "all-zero" in check.stderr


def test_trained_adapter_with_real_targets_has_no_warning(tiny_lora, tmp_path):
    result = converted(tmp_path, tiny_lora, "--lora-rank", 8)
    assert "warning" not in result.stderr


@pytest.mark.parametrize("name", ["~nosuchuser_lora_convert/gemma", "~", "a\u0000b", "x" * 5000, "/proc/self/x",
                                  "../../../../etc"])
def test_odd_base_model_names_are_only_names(name, tiny_lora, tmp_path):
    edit_config(tiny_lora, base_model_name_or_path=name)
    converted(tmp_path, tiny_lora)


def rank_two_adapter(folder: Path) -> Path:
    return make_adapter(folder, r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])


def test_lora_rank_defaults_to_the_adapters_rank_rounded_up_and_says_so(tmp_path):
    adapter = rank_two_adapter(tmp_path / "adapter")
    args = [arg for arg in base_args(TINY, tmp_path / "cli", "--lora-ckpt", adapter) if arg != "--quiet"]
    result = run_convert(*args)
    assert result.exit_code == 0, result.output
    assert "zero-padding the rank-2 adapter to rank 4" in result.stderr and "--lora-rank not given" in result.stderr
    assert WeightFile(tmp_path / "cli" / "lora.tflite").lora_rank == 4
    ours, lora = our_logits(tmp_path, adapter, rank=None)
    assert lora.lora_rank == 4
    torch.testing.assert_close(ours, peft_logits(adapter), atol=3e-5, rtol=0)
    check = run_convert("--check-adapter", adapter, "--model-type", "GEMMA_2B", "--input-ckpt", TINY)
    assert check.exit_code == 0 and "rank 2 (LoRA file rank 4" in check.stdout


@pytest.mark.parametrize("rank,words", [("2", ["--lora-rank 2", "multiples of 4", "use 4"]),
                                        ("6", ["--lora-rank 6", "use 8"]),
                                        ("1", ["--lora-rank 1", "below the adapter's rank 2", "use 4"])])
def test_a_rank_the_runtime_cannot_take_says_which_to_use(rank, words, tmp_path):
    adapter = rank_two_adapter(tmp_path / "adapter")
    line = refused(tmp_path, adapter, "--lora-rank", rank)
    assert all(word in line for word in words), line


def test_default_rank_above_max_rank_is_refused(tiny_lora, tmp_path):
    line = refused(tmp_path, tiny_lora, "--max-rank", 4)
    assert "--max-rank 4" in line and "adapter's rank is 8" in line


def test_rank_pattern_regex_matches_as_peft_does(tmp_path):
    """PEFT matches `(.*\\.)?(<key>)$`: an alternation key applies to both names."""
    adapter = make_adapter(tmp_path / "adapter", r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           alpha_pattern={"q_proj|v_proj": 40})
    ours, _ = our_logits(tmp_path, adapter)
    torch.testing.assert_close(ours, peft_logits(adapter), atol=3e-5, rtol=0)


def test_pissa_adapter_saved_converted_is_plain_lora_and_agrees_with_peft(tmp_path):
    """PEFT's path_initial_model_for_weight_conversion turns a PiSSA adapter into plain LoRA (rank 2r)
    for the original base; saved without it, the adapter belongs to the residual base: refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    peft.peft_config["default"].init_lora_weights = True  # PEFT's documented step before saving the initial one
    peft.save_pretrained(str(tmp_path / "initial"))
    peft.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, parameter in peft.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft.save_pretrained(str(tmp_path / "residual"))
    line = refused(tmp_path, tmp_path / "residual")
    assert "init_lora_weights \"pissa\"" in line and "path_initial_model_for_weight_conversion" in line
    peft.save_pretrained(str(tmp_path / "converted"),
                         path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours, lora = our_logits(tmp_path, tmp_path / "converted", rank=None)
    assert lora.lora_rank == 8
    torch.testing.assert_close(ours, peft_logits(tmp_path / "converted"), atol=3e-5, rtol=0)


PHI2_SAVED = {  # LoraConfig arguments, the parameters "training" changes besides LoRA
    "modules_to_save lm_head and embed_tokens": (dict(modules_to_save=["lm_head", "embed_tokens"]), "modules_to_save"),
    "bias all": (dict(bias="all"), ".bias"),
    "bias lora_only": (dict(bias="lora_only"), "base_layer.bias"),
}


@pytest.mark.parametrize("case", PHI2_SAVED)
def test_phi2_saved_modules_and_biases_merge_like_peft(case, tmp_path):
    """A Phi-2 adapter saved with modules_to_save=["lm_head", "embed_tokens"] carries lm_head.bias
    (bias="all" / "lora_only": trained biases): recognised, refused as a LoRA file with a pointer to
    merging, merged exactly with the flags."""
    from peft import LoraConfig, get_peft_model

    from .test_families_other import PROMPTS, convert, hf_model, logits, save

    checkpoint = save(hf_model("PHI_2"), tmp_path / "ckpt", False)
    extra, trained = PHI2_SAVED[case]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra)
    torch.manual_seed(11)
    peft = get_peft_model(hf_model("PHI_2"), config).eval()
    with torch.no_grad():  # "training" of the saved modules
        for name, parameter in peft.named_parameters():
            if trained in name and parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft.save_pretrained(str(tmp_path / "adapter"))
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(key.endswith(".bias") for key in keys)
    args = ("--model-type", "PHI_2", "--input-ckpt", checkpoint, "--vocab-model-file", TOKENIZER,
            "--output-dir", tmp_path / "refused", "--lora-ckpt", tmp_path / "adapter")
    result = run_convert(*args, "--lora-rank", 4)
    assert result.exit_code == 1 and "--merge-lora --merge-unsupported" in result.stderr, result.output
    assert "neither" not in result.stderr and "not LoRA weights" not in result.stderr
    check = run_convert("--check-adapter", tmp_path / "adapter", "--model-type", "PHI_2", "--input-ckpt", checkpoint,
                        "--merge-lora", "--merge-unsupported")
    assert check.exit_code == 0 and ".bias " in check.stdout, check.output
    out = convert(checkpoint, "PHI_2", tmp_path / "out", "fp32", "--lora-ckpt", tmp_path / "adapter", "--merge-lora",
                  "--merge-unsupported")
    merged = ReferenceModel(WeightFile(out / "model.bin"))
    plain = ReferenceModel(WeightFile(convert(checkpoint, "PHI_2", tmp_path / "plain", "fp32") / "model.bin"))
    for ids in PROMPTS:
        theirs = logits(peft, ids)
        torch.testing.assert_close(merged.forward(ids)[0], theirs, atol=1e-4, rtol=0)
        assert (theirs - plain.forward(ids)[0]).abs().max() > 0.05  # the adapter matters


def test_old_peft_modules_to_save_key_layout_is_read(tiny_lora, tmp_path):
    """Older PEFT kept the wrapper in the key: `norm.modules_to_save.default.weight`."""
    key = "base_model.model.model.norm.modules_to_save.default.weight"
    edit_tensors(tiny_lora, lambda t: t.update({key: torch.full((64,), 0.5)}))
    line = refused(tmp_path, tiny_lora, "--merge-lora")
    assert "norm" in line and "modules_to_save" in line and "--merge-unsupported" in line
    converted(tmp_path, tiny_lora, "--merge-lora", "--merge-unsupported", name="merged")


def test_bias_replacing_a_tensor_the_base_lacks_is_refused(tiny_lora, tmp_path):
    edit_tensors(tiny_lora, lambda t: t.update({PREFIX + "0.self_attn.q_proj.base_layer.bias": torch.zeros(64)}))
    line = refused(tmp_path, tiny_lora, "--merge-lora", "--merge-unsupported")
    assert "q_proj.base_layer.bias" in line and "has no layers.0.self_attn.q_proj.bias" in line


def test_load_adapter_reads_a_big_adapter_in_chunks(tiny_lora, monkeypatch):
    """Values are checked chunk by chunk (never a whole tensor above COMPARE_ROWS rows at once)."""
    from converter import adapter as adapter_module
    from converter.models import find_model_type
    from converter.plan import resolve_dims

    monkeypatch.setattr(adapter_module, "COMPARE_ROWS", 16)
    seen = []
    real_open = adapter_module.open_tensor_file

    def spy(path):
        source = real_open(path)
        rows = source.rows

        def counted(name, start, stop):
            seen.append(stop - start)
            return rows(name, start, stop)
        source.rows = counted
        return source
    monkeypatch.setattr(adapter_module, "open_tensor_file", spy)
    family, kind = find_model_type("GEMMA_2B")
    dims, config = resolve_dims(family, kind, TINY)
    loaded = adapter_module.load_adapter(tiny_lora, family, dims, kind.name, base_config=config)
    loaded.source.close()
    assert max(seen) == 16  # the 64-row lora_B halves were read 16 rows at a time


def test_library_refuses_before_writing(tiny_lora, tmp_path):
    from converter import ConversionConfig, convert

    edit_config(tiny_lora, lora_alpha=float("nan"))
    with pytest.raises(ConversionError, match="lora_alpha must be a finite number, got NaN"):
        convert(ConversionConfig(input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B",
                                 output_dir=tmp_path / "out", vocab_model_file=TOKENIZER, lora_ckpt=tiny_lora))
    assert not (tmp_path / "out").exists()


def test_a_config_without_lora_alpha_gets_peft_s_default_with_a_note(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    drop_config_key(adapter, "lora_alpha")  # PEFT then uses its default 8: scale 2, not 1
    result = converted(tmp_path / "cli", adapter, "--lora-rank", 4)
    assert f"{adapter / 'adapter_config.json'} has no lora_alpha: using PEFT's default 8" in result.stderr
    ours, _ = our_logits(tmp_path, adapter, rank=4)
    torch.testing.assert_close(ours, peft_logits(adapter), atol=3e-5, rtol=0)
