"""Llama 3.x and Qwen 2.5, the CPU-only families: intake, refusals, and their litert-torch graphs
against transformers on tiny random checkpoints (made here with transformers, not committed)."""
from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import pytest
import torch

from converter.detect import infer_model_type
from converter.errors import ConversionError
from converter.models import find_model_type
from converter.models.base import dims_from_config

from . import test_cpu_backend as helpers  # LiteRT-LM CPU runs, PEFT adapters, greedy text
from .conftest import TOKENIZER, run_convert

# The checked-in tiny tokenizer's vocabulary and ids (512 pieces, <bos> 2, <eos> 1).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=64, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True)
# Llama 3's scaling with a short original context, so that it changes the tiny model's output.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LLAMA3_2_1B", dict(rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "qwen2": ("QWEN2_5_0_5B", dict(rope_theta=1000000.0)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(kind: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    return (LlamaConfig if kind == "llama" else Qwen2Config)(**{**TINY, **FAMILIES[kind][1], **overrides})


def tiny_model(kind: str, **overrides):
    """A tiny random model; every parameter (biases too) drawn from N(0, 0.2) so none is trivial."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family kind, tiny checkpoint folder, its PEFT LoRA folder: rank 4, alpha 8, all seven targets)."""
    from peft import LoraConfig, get_peft_model

    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    model = tiny_model(kind)
    model.save_pretrained(folder / "base")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(folder / "lora")
    return kind, folder / "base", folder / "lora"


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def cpu_plan(base: Path, model_type: str, out: Path, **options):
    from converter.config import ConversionConfig
    from converter.plan import make_plan

    return make_plan(ConversionConfig(input_ckpt=base, ckpt_format="safetensors", model_type=model_type,
                                      output_dir=out, vocab_model_file=TOKENIZER, backend="cpu", **options))


def test_cpu_graph_agrees_with_transformers(checkpoint, tmp_path):
    """The family's litert-torch graph, sized and loaded by the CPU backend from our plan, gives
    transformers' logits (Llama 3's rotary scaling, Qwen's q/k/v biases, tied output projection)."""
    from transformers import AutoModelForCausalLM

    from converter.cpu import graph
    from converter.cpu.litert import litert_torch

    kind, base, _ = checkpoint
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits

    def cpu_logits(settings: dict) -> torch.Tensor:
        plan = cpu_plan(base, FAMILIES[kind][0], tmp_path / "out")
        plan.hf_config = settings
        try:
            config = graph.model_config(plan, 64)
            model = graph.build_model(plan, config)
            graph.load_weights(plan, model, config)
        finally:
            plan.close()
        cache = litert_torch().kv_cache.KVCache.from_model_config(64, config)
        mask = torch.triu(torch.full((ids.shape[1], 64), float("-inf")), diagonal=1)[None, None]
        with torch.no_grad():
            return model(ids, torch.arange(ids.shape[1]), cache, mask=mask)["logits"]

    config = config_of(base)
    assert torch.allclose(cpu_logits(config), expected, atol=1e-5, rtol=0)
    if kind == "llama":  # the scaling is honoured: without it the logits differ
        unscaled = {**config, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
        assert (cpu_logits(unscaled) - expected).abs().max() > 1e-3


def test_gpu_backend_is_refused_in_one_line(checkpoint, tmp_path):
    kind, base, _ = checkpoint
    out = tmp_path / "out"
    result = run_convert("--model-type", FAMILIES[kind][0], "--input-ckpt", base, "--vocab-model-file", TOKENIZER,
                         "--output-dir", out)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"error: --backend gpu is not supported for {FAMILIES[kind][0]} (backends: cpu)\n"
    assert not out.exists()


def test_peft_adapter_is_read_with_every_target(checkpoint):
    """--check-adapter takes the PEFT adapter: seven modules per layer, alpha/r folded (8/4 = 2)."""
    kind, base, lora = checkpoint
    result = run_convert("--check-adapter", lora, "--model-type", FAMILIES[kind][0], "--input-ckpt", base)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("layer")]
    modules = [line.split()[2] for line in lines]
    assert modules == [f"{part}.{name}" for _ in range(2) for name in TARGETS
                       for part in ["self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                                    else "mlp"]]
    assert all("rank 4, scale 2" in line for line in lines)


@pytest.mark.parametrize("model_type, config", [
    ("LLAMA3_2_1B", dict(model_type="llama", num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256)),
    ("LLAMA3_2_3B", dict(model_type="llama", num_hidden_layers=28, hidden_size=3072, intermediate_size=8192,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256)),
    ("QWEN2_5_0_5B", dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                          num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
])
def test_model_type_is_inferred_from_real_configs(tmp_path, model_type, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert infer_model_type(tmp_path) == model_type


@pytest.mark.parametrize("kind, overrides, words", [
    ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["rope_scaling type 'yarn'", "'llama3'"]),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["low_freq_factor"]),
    ("llama", dict(attention_bias=True), ["attention_bias True"]),
    ("llama", dict(hidden_act="gelu"), ["hidden_act 'gelu'"]),
    ("llama", dict(tie_word_embeddings=False), ["tie_word_embeddings false"]),
    ("qwen2", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), ["rope_scaling type 'linear'"]),
    ("qwen2", dict(use_sliding_window=True), ["use_sliding_window"]),
])
def test_settings_the_cpu_graph_cannot_express_are_refused(kind, overrides, words):
    family, _ = find_model_type(FAMILIES[kind][0])
    config = {**hf_config(kind).to_dict(), **overrides}
    config.pop("rope_parameters") if "rope_scaling" in overrides else None
    with pytest.raises(ConversionError) as error:
        family.parameters(dims_from_config(family, config, "config.json"), config)
    message = str(error.value)
    assert "\n" not in message and message.startswith("config.json") and all(w in message for w in words), message


def test_missing_tensors_are_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from converter.checkpoint import open_checkpoint
    from converter.plan import plan_base

    kind, base, _ = checkpoint
    family, _ = find_model_type(FAMILIES[kind][0])
    dims = dims_from_config(family, config_of(base), "config.json")
    with closing(open_checkpoint(base, "safetensors")) as source:
        planned = {item.source for item in plan_base(family, dims, source, "int8")}
    assert ("model.layers.1.self_attn.q_proj.bias" in planned) == (kind == "qwen2")
    tensors = load_file(base / "model.safetensors")
    gone = "model.layers.1.self_attn.v_proj.bias" if kind == "qwen2" else "model.layers.1.mlp.down_proj.weight"
    del tensors[gone]
    save_file(tensors, tmp_path / "model.safetensors")
    with closing(open_checkpoint(tmp_path / "model.safetensors", "safetensors")) as source, \
            pytest.raises(ConversionError, match=f"missing tensor\\(s\\) {gone.replace('.', '[.]')} for a 2-layer"):
        plan_base(family, dims, source, "int8")



def test_cli_refuses_bad_llama_checkpoints_in_one_line(checkpoint, tmp_path):
    """--backend cpu: an unmodelled rotary scaling and a missing tensor are one line each; nothing written."""
    from safetensors.torch import load_file, save_file

    kind, base, _ = checkpoint
    if kind != "llama":
        pytest.skip("the Llama checkpoint's cases")
    yarn, missing = tmp_path / "yarn", tmp_path / "missing"
    for folder in (yarn, missing):
        folder.mkdir()
        (folder / "config.json").write_text((base / "config.json").read_text())
    tensors = load_file(base / "model.safetensors")
    save_file(tensors, yarn / "model.safetensors")
    config = config_of(base)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}
    (yarn / "config.json").write_text(json.dumps(config))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, missing / "model.safetensors")
    for folder, expected in ((yarn, "error: config.json: rope_scaling type 'yarn' is not supported"),
                             (missing, "error: checkpoint is missing tensor(s) model.layers.0.self_attn.k_proj.weight")):
        out = tmp_path / f"out-{folder.name}"
        result = run_convert("--backend", "cpu", "--model-type", "LLAMA3_2_1B", "--input-ckpt", folder,
                             "--vocab-model-file", TOKENIZER, "--output-dir", out, "--quiet")
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
        assert result.stderr.startswith(expected), result.stderr
        assert not out.exists()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def generated(request, tmp_path_factory):
    """(kind, base model, PEFT model, LiteRT-LM's texts): `lora-convert --backend cpu` (fp32) with a
    rank-4 q/k/v/o adapter (alpha 8) as a LoRA file, `lora-bundle --format litertlm`, then LiteRT-LM's
    CPU backend, greedy, with and without the LoRA file (with tests/test_cpu_backend.py's helpers)."""
    kind = request.param
    folder = tmp_path_factory.mktemp(f"{kind}-litertlm")
    model = tiny_model(kind)
    model.save_pretrained(folder / "ckpt")
    peft = helpers.peft_model(tiny_model(kind))
    peft.save_pretrained(folder / "adapter")
    bundle = helpers.cpu_convert(folder / "ckpt", FAMILIES[kind][0], folder / "out", TOKENIZER, "--quantization", "fp32",
                         "--lora-ckpt", folder / "adapter", "--lora-output-tflite-file", folder / "out" / "lora.bin")
    # Base texts from an engine that never saw the LoRA: LiteRT-LM 0.18.1's CPU executor keeps the last
    # LoRA it loaded for later sessions that name none.
    prompts, tokens = helpers.PROMPTS, helpers.MAX_TOKENS
    texts = {"base": helpers.run_cpu(bundle, prompts, tokens)["base"],
             "lora": helpers.run_cpu(bundle, prompts, tokens, folder / "out" / "lora.bin")["lora"]}
    return kind, model, peft, texts


def test_litertlm_cpu_generates_transformers_and_peft_text(generated):
    kind, model, peft, texts = generated
    expected = [helpers.hf_greedy(peft, prompt) for prompt in helpers.PROMPTS]
    assert texts["lora"] == expected
    assert texts["base"] == [helpers.hf_greedy(model, prompt) for prompt in helpers.PROMPTS]
    assert texts["lora"] != texts["base"]  # the runtime picked the adapter up
    unscaled = helpers.peft_model(tiny_model(kind), alpha=4)  # alpha = r: PEFT's scale 2 is what makes the text
    assert texts["lora"] != [helpers.hf_greedy(unscaled, prompt) for prompt in helpers.PROMPTS]
