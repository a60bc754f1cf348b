"""Every bad input: one `error:` line naming what is wrong, exit 1, no traceback, no output files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import ROOT, TINY, TINY_LORA, TOKENIZER, base_args, run_convert

LORA_ARGS = ("--lora-ckpt", "{lora}", "--lora-rank", "8")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def set_value(name: str, value: float):
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[5] = value
    return edit


def nan_weight(ckpt, lora):
    edit_tensors(ckpt / "model.safetensors", set_value("model.layers.1.mlp.up_proj.weight", float("nan")))


def inf_lora(ckpt, lora):
    edit_tensors(lora / "adapter_model.safetensors",
                 set_value("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", float("inf")))


def drop(name: str, file: str = "model.safetensors", where: str = "ckpt"):
    def edit(ckpt, lora):
        folder = ckpt if where == "ckpt" else lora
        edit_tensors(folder / file, lambda t: t.pop(name))
    return edit


def add_tensor(name: str, tensor: torch.Tensor, where: str = "ckpt"):
    def edit(ckpt, lora):
        folder, file = (ckpt, "model.safetensors") if where == "ckpt" else (lora, "adapter_model.safetensors")
        edit_tensors(folder / file, lambda t: t.update({name: tensor}))
    return edit


def config(**changes):
    return lambda ckpt, lora: edit_json(ckpt / "config.json", **changes)


def adapter_config(**changes):
    return lambda ckpt, lora: edit_json(lora / "adapter_config.json", **changes)


def write(name: str, data: bytes, where: str = "ckpt"):
    return lambda ckpt, lora: ((ckpt if where == "ckpt" else lora) / name).write_bytes(data)


def truncate(ckpt, lora):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def lora_from_other_model(ckpt, lora):
    edit_tensors(lora / "adapter_model.safetensors", lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 128)}))


def int_tensor(ckpt, lora):
    edit_tensors(ckpt / "model.safetensors", lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int64)}))


def pytorch_legacy(ckpt, lora):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")


def both(*edits):
    def edit(ckpt, lora):
        for one in edits:
            one(ckpt, lora)
    return edit


def hf_tokenizer(damage):
    """A Hugging Face tokenizer folder in the checkpoint (tests/test_hf_tokenizer.py), then damaged."""
    def edit(ckpt, lora):
        from .test_hf_tokenizer import handmade_tokenizer

        damage(handmade_tokenizer(ckpt / "hf-tokenizer"))
    return edit


HF_TOKENIZER_ARGS = ("--vocab-model-file", "{ckpt}/hf-tokenizer")
MERGE_ARGS = ("--lora-ckpt", "{lora}", "--merge-lora", "--merge-unsupported")
PREFIX = "base_model.model.model."

CASES = {
    # name: (edit, extra CLI args, words the message must contain)
    "missing checkpoint": (None, ("--input-ckpt", "{tmp}/nowhere"), ["nowhere", "not found"]),
    "corrupt safetensors": (write("model.safetensors", b"garbage!" * 4), (), ["model.safetensors", "safetensors"]),
    "truncated safetensors": (truncate, (), ["model.safetensors", "truncated"]),
    "unsupported dtype": (int_tensor, (), ["model.norm.weight", "I64"]),
    "legacy pytorch file": (pytorch_legacy, ("--ckpt-format", "pytorch"), ["pytorch_model.bin", "zip"]),
    "missing tensor": (drop("model.layers.1.self_attn.v_proj.weight"), (), ["model.layers.1.self_attn.v_proj.weight", "missing"]),
    "unknown tensor": (add_tensor("model.layers.0.extra.weight", torch.zeros(4)), (), ["model.layers.0.extra.weight"]),
    "shape contradicts config": (config(intermediate_size=128), (), ["mlp.gate_proj.weight", "[256, 64]", "[128, 64]"]),
    "wrong architecture": (config(model_type="llama"), (), ["config.json", "llama", "GEMMA_2B"]),
    "other model type's shapes": (
        config(num_hidden_layers=28, hidden_size=3072, intermediate_size=24576, num_attention_heads=16,
               num_key_value_heads=16, head_dim=256, vocab_size=256000), (), ["GEMMA_7B"]),
    "bad config value": (config(hidden_size="64"), (), ["config.json", "hidden_size"]),
    "unsupported rope": (config(rope_parameters={"rope_theta": 500000.0}), (), ["rope_theta"]),
    "NaN weight": (nan_weight, (), ["model.layers.1.mlp.up_proj.weight", "NaN"]),
    "missing tokenizer": (None, ("--vocab-model-file", "{tmp}/none.model"), ["none.model", "file not found"]),
    "invalid tokenizer": (write("bad.model", b"\x00\x01 not sentencepiece"), ("--vocab-model-file", "{ckpt}/bad.model"),
                          ["bad.model", "SentencePiece"]),
    "tokenizer folder without tokenizer.json": (None, ("--vocab-model-file", "{ckpt}"),
                                                ["folder", "tokenizer.json", "SentencePiece"]),
    "tokenizer folder without tokenizer_config.json": (
        hf_tokenizer(lambda folder: (folder / "tokenizer_config.json").unlink()), HF_TOKENIZER_ARGS,
        ["tokenizer_config.json"]),
    "tokenizer folder with broken JSON": (
        hf_tokenizer(lambda folder: (folder / "tokenizer.json").write_text("{")), HF_TOKENIZER_ARGS,
        ["tokenizer.json", "not valid JSON"]),
    "tokenizer folder of a WordPiece model": (
        hf_tokenizer(lambda folder: edit_json(folder / "tokenizer.json", model={"type": "WordPiece", "vocab": {}})),
        HF_TOKENIZER_ARGS, ["tokenizer.json", "WordPiece", "BPE"]),
    "unsupported model type": (None, ("--model-type", "LLAMA_3"), ["LLAMA_3", "GEMMA_2B"]),
    "cpu backend for a family litert-torch cannot build": (None, ("--backend", "cpu", "--model-type", "FALCON_RW_1B"),
                                                           ["--backend cpu is not supported for FALCON_RW_1B"]),
    "cpu backend lora rank": (None, ("--backend", "cpu", *LORA_ARGS), ["--lora-rank 8", "16 or 32"]),
    "output dir is a file": (None, ("--output-dir", "{ckpt}/config.json"), ["--output-dir", "file"]),
    "rank below adapter's": (None, ("--lora-ckpt", "{lora}", "--lora-rank", "4"), ["--lora-rank 4", "rank 8"]),
    "lora rank from config disagrees": (adapter_config(r=16), LORA_ARGS, ["r=16", "rank 8"]),
    "NaN-free but Inf lora": (inf_lora, LORA_ARGS, ["k_proj.lora_B", "Inf"]),
    "lora missing B": (drop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                            "adapter_model.safetensors", "lora"), LORA_ARGS, ["layer 0", "q_proj", "lora_B"]),
    "lora on unsupported target": (
        add_tensor("base_model.model.model.layers.0.input_layernorm.lora_A.weight", torch.zeros(8, 64), "lora"),
        LORA_ARGS, ["input_layernorm", "not supported", "GEMMA_2B"]),
    "lora unknown key": (add_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", torch.zeros(4),
                                    "lora"), LORA_ARGS, ["q_proj.lora_C.weight", "not LoRA"]),
    "lm_head on a tied model": (add_tensor("base_model.model.lm_head.weight", torch.zeros(512, 64), "lora"), LORA_ARGS,
                                ["lm_head.weight", "one tensor for the embedding and the output"]),
    "lora for another model": (lora_from_other_model, LORA_ARGS, ["q_proj", "[8, 128]", "[r, 64]"]),
    "lora beyond last layer": (
        add_tensor("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", torch.zeros(8, 64), "lora"),
        LORA_ARGS, ["layer 7", "2 layers"]),
    "DoRA": (adapter_config(use_dora=True), LORA_ARGS, ["DoRA"]),
    "merge with a LoRA output file": (None, ("--lora-ckpt", "{lora}", "--merge-lora", "--lora-output-tflite-file",
                                            "{tmp}/out/lora.bin"), ["--merge-lora", "drop --lora-output-tflite-file"]),
    "merge with a LoRA rank": (None, ("--lora-ckpt", "{lora}", "--merge-lora", "--lora-rank", "8"),
                               ["--merge-lora", "drop --lora-rank"]),
    "merge-unsupported alone": (None, (*LORA_ARGS, "--merge-unsupported"), ["--merge-unsupported", "--merge-lora"]),
    "merge without an adapter": (None, ("--merge-lora",), ["--merge-lora", "--lora-ckpt"]),
    "merge in MediaPipe compat mode": (None, ("--lora-ckpt", "{lora}", "--merge-lora", "--mediapipe-compat"),
                                       ["--merge-lora", "--mediapipe-compat"]),
    "Inf in a merged adapter": (inf_lora, MERGE_ARGS, ["k_proj.lora_B", "Inf"]),
    "DoRA magnitude of another shape": (
        add_tensor(PREFIX + "layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(32), "lora"), MERGE_ARGS,
        ["q_proj.lora_magnitude_vector", "[32]", "[64]"]),
    "use_dora without magnitudes": (adapter_config(use_dora=True), MERGE_ARGS,
                                    ["use_dora", "lora_magnitude_vector is missing"]),
    "modules_to_save tensor of another shape": (add_tensor(PREFIX + "norm.weight", torch.zeros(32), "lora"), MERGE_ARGS,
                                                ["model.norm.weight", "[32]", "[64]"]),
    "embedding LoRA untied in PEFT": (
        both(add_tensor(PREFIX + "embed_tokens.lora_embedding_A", torch.zeros(8, 512), "lora"),
             add_tensor(PREFIX + "embed_tokens.lora_embedding_B", torch.zeros(64, 8), "lora")), MERGE_ARGS,
        ["embed_tokens", "input lookup only", "ensure_weight_tying"]),
    "embedding LoRA of another vocabulary": (
        both(adapter_config(ensure_weight_tying=True),
             add_tensor(PREFIX + "embed_tokens.lora_embedding_A", torch.zeros(8, 500), "lora"),
             add_tensor(PREFIX + "embed_tokens.lora_embedding_B", torch.zeros(64, 8), "lora")), MERGE_ARGS,
        ["lora_embedding_A", "[8, 500]", "[r, 512]"]),
    "lm_head LoRA that is not the tied copy": (
        both(adapter_config(ensure_weight_tying=True),
             add_tensor(PREFIX + "embed_tokens.lora_embedding_A", torch.zeros(8, 512), "lora"),
             add_tensor(PREFIX + "embed_tokens.lora_embedding_B", torch.zeros(64, 8), "lora"),
             add_tensor("base_model.model.lm_head.lora_A.weight", torch.ones(8, 64), "lora"),
             add_tensor("base_model.model.lm_head.lora_B.weight", torch.ones(512, 8), "lora")), MERGE_ARGS,
        ["lm_head.lora_A.weight", "not the tied copy"]),
    "missing adapter": (None, ("--lora-ckpt", "{tmp}/no-adapter", "--lora-rank", "8"), ["no-adapter", "not found"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line_and_leaves_no_output(case, tiny, tiny_lora, tmp_path):
    edit, extra, words = CASES[case]
    if edit:
        edit(tiny, tiny_lora)
    out = tmp_path / "out"
    fill = {"tmp": tmp_path, "ckpt": tiny, "lora": tiny_lora}
    extra = [str(arg).format(**fill) for arg in extra]
    result = run_convert(*base_args(tiny, out), *extra)
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output
    assert not out.exists() or list(out.iterdir()) == []


def test_usage_errors_exit_2(tmp_path):
    result = run_convert("--model-type", "GEMMA_2B")
    assert result.exit_code == 2 and "Missing option" in result.stderr


def test_real_process_reports_error_without_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    command = [sys.executable, "-m", "converter.cli", *map(str, base_args(TINY, tmp_path / "o")),
               "--lora-ckpt", str(TINY_LORA), "--lora-rank", "2"]
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        f"error: --lora-rank 2 is below the adapter's rank 8 ({TINY_LORA}); use 8 or leave --lora-rank out"]
    assert not (tmp_path / "o").exists()
    assert TOKENIZER.exists()
