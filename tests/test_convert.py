"""End-to-end conversions of the tiny Gemma: every tensor read back through our reader."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter import ConversionConfig, convert, tflite
from converter.proto import llm_params_pb2

from .conftest import TINY, TINY_LORA, TOKENIZER, base_args, run_convert

CONFIG = json.loads((TINY / "config.json").read_text())
L = "params.lm.transformer.x_layers_{i}."
BASE = load_file(str(TINY / "model.safetensors"))
LORA = load_file(str(TINY_LORA / "adapter_model.safetensors"))
ALPHA, RANK = 32, 8
MATRICES = {
    "self_attn.q_proj": "self_attention.q.w", "self_attn.k_proj": "self_attention.k.w",
    "self_attn.v_proj": "self_attention.v.w", "self_attn.o_proj": "self_attention.post.w",
    "mlp.gate_proj": "ff_layer.ffn_layer1_gate.w", "mlp.up_proj": "ff_layer.ffn_layer1.w",
    "mlp.down_proj": "ff_layer.ffn_layer2.w",
}
NORMS = {"input_layernorm": "pre_layer_norm.scale", "post_attention_layernorm": "ff_layer.pre_layer_norm.scale"}


def pairs():
    """(HF name, MP name) of every base matrix."""
    yield "model.embed_tokens.weight", "params.lm.softmax.logits_ffn.w"
    for i in range(CONFIG["num_hidden_layers"]):
        for hf, mp in MATRICES.items():
            yield f"model.layers.{i}.{hf}.weight", L.format(i=i) + mp


def lora_ab(layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
    return LORA[f"{prefix}.lora_A.weight"], LORA[f"{prefix}.lora_B.weight"]


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def converted(tmp_path: Path, *extra) -> tuple[tflite.WeightFile, tflite.WeightFile | None]:
    out = tmp_path / "out"
    args = base_args(TINY, out, *extra)
    if "--lora-ckpt" in extra:
        args += ["--lora-output-tflite-file", out / "lora.bin"]
    result = run_convert(*args)
    assert result.exit_code == 0, result.output
    lora = tflite.WeightFile(out / "lora.bin") if (out / "lora.bin").exists() else None
    return tflite.WeightFile(out / "model.bin"), lora


@pytest.mark.parametrize("quantization,bits", [("int8", 8), ("int4", 4)])
def test_quantized_weights_round_trip_within_half_a_step(tmp_path, quantization, bits):
    weights, _ = converted(tmp_path, "--quantization", quantization)
    for hf, mp in pairs():
        original = BASE[hf].float()
        restored = weights.matrix(mp, *original.shape)
        step = original.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((restored - original).abs() <= step / 2 + 1e-7).all(), mp
        sums = torch.from_numpy(weights.raw(f"{mp}.sum_i").copy()).view(torch.int32)
        assert torch.equal(sums, torch.round(restored / step.clamp(min=1e-30)).sum(dim=1).to(torch.int32)), mp
    for i in range(CONFIG["num_hidden_layers"]):
        for hf, mp in NORMS.items():
            assert torch.equal(weights.vector(L.format(i=i) + mp), BASE[f"model.layers.{i}.{hf}.weight"])
    assert torch.equal(weights.vector("params.lm.final_ln.scale"), BASE["model.norm.weight"])


@pytest.mark.parametrize("quantization,dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_float_weights_are_exact(tmp_path, quantization, dtype):
    weights, _ = converted(tmp_path, "--quantization", quantization)
    for hf, mp in pairs():
        assert torch.equal(weights.matrix(mp, *BASE[hf].shape), BASE[hf].to(dtype).float()), mp
        assert weights.tensors[mp].type == (tflite.FLOAT16 if dtype == torch.float16 else tflite.FLOAT32)


def test_metadata_and_parameters_come_from_config(tmp_path):
    weights, _ = converted(tmp_path)
    assert weights.subgraph_name == "GEMMA_2B"
    assert weights.metadata[tflite.LLM_MODEL_TYPE] == 6
    assert weights.metadata[tflite.BACKEND] == b"gpu"
    assert weights.metadata[tflite.SPM_VOCAB_MODEL] == TOKENIZER.read_bytes()
    params = llm_params_pb2.LlmParameters.FromString(weights.metadata[tflite.LLM_PARAMETERS])
    t = params.transformer_parameters
    assert (t.num_stacks, t.embedding_dim, t.hidden_dimension, t.num_heads, t.head_dimension, t.num_kv_heads) == (
        CONFIG["num_hidden_layers"], CONFIG["hidden_size"], CONFIG["intermediate_size"],
        CONFIG["num_attention_heads"], CONFIG["head_dim"], CONFIG["num_key_value_heads"])
    assert params.vocab_size == CONFIG["vocab_size"] and params.start_token_id == 2
    assert list(params.stop_tokens) == ["<eos>"]
    assert tflite.LORA_RANK not in weights.metadata
    assert (tmp_path / "out" / "model.bin").stat().st_mode & 0o777 != 0o600  # follows the umask


def test_lora_is_fp16_tiled_with_alpha_folded_into_b(tmp_path):
    base, lora = converted(tmp_path, "--lora-ckpt", TINY_LORA, "--lora-rank", RANK)
    assert lora.metadata[tflite.LORA_RANK] == RANK
    assert lora.metadata[tflite.LLM_PARAMETERS] == base.metadata[tflite.LLM_PARAMETERS]
    scale = ALPHA / RANK
    names = []
    for i in range(CONFIG["num_hidden_layers"]):
        for module, mp in [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")]:
            a, b = lora_ab(i, module)
            prefix = L.format(i=i) + f"self_attention.{mp}."
            assert torch.equal(lora.matrix(prefix + "w_prime_left", *a.shape), fp16(a))
            assert torch.equal(lora.matrix(prefix + "w_prime_right", *b.shape), fp16(b * scale))
            names += [prefix + "w_prime_left", prefix + "w_prime_right"]
        a, b = lora_ab(i, "o_proj")
        prefix = L.format(i=i) + "self_attention.post."
        assert torch.equal(lora.matrix(prefix + "w_prime_right", *a.shape), fp16(a))  # roles swap for post
        assert torch.equal(lora.matrix(prefix + "w_prime_left", *b.shape), fp16(b * scale))
        names += [prefix + "w_prime_right", prefix + "w_prime_left"]
    assert list(lora.tensors) == names


def test_mediapipe_compat_reinterprets_o_proj_and_keeps_raw_scale(tmp_path):
    _, lora = converted(tmp_path, "--lora-ckpt", TINY_LORA, "--lora-rank", RANK, "--mediapipe-compat")
    a, b = lora_ab(0, "o_proj")
    prefix = L.format(i=0) + "self_attention.post."
    assert torch.equal(lora.matrix(prefix + "w_prime_right", *a.shape), fp16(a.t().reshape(a.shape)))
    assert torch.equal(lora.matrix(prefix + "w_prime_left", *b.shape), fp16(b.t().reshape(b.shape)))
    a, b = lora_ab(0, "q_proj")
    assert torch.equal(lora.matrix(L.format(i=0) + "self_attention.q.w_prime_right", *b.shape), fp16(b))


def test_rslora_scale_and_rank_padding(tmp_path, tiny_lora):
    config = json.loads((tiny_lora / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (tiny_lora / "adapter_config.json").write_text(json.dumps(config))
    _, lora = converted(tmp_path, "--lora-ckpt", tiny_lora, "--lora-rank", 16)
    a, b = lora_ab(1, "v_proj")
    left = lora.matrix(L.format(i=1) + "self_attention.v.w_prime_left", 16, a.shape[1])
    right = lora.matrix(L.format(i=1) + "self_attention.v.w_prime_right", b.shape[0], 16)
    assert torch.equal(left[:8], fp16(a)) and not left[8:].any()
    assert torch.equal(right[:, :8], fp16(b * (ALPHA / math.sqrt(RANK)))) and not right[:, 8:].any()
    assert lora.metadata[tflite.LORA_RANK] == 16


def test_missing_attention_targets_are_zero_filled(tmp_path, tiny_lora):
    kept = {k: v for k, v in LORA.items() if ".q_proj." in k or ".v_proj." in k}
    save_file(kept, str(tiny_lora / "adapter_model.safetensors"))
    _, lora = converted(tmp_path, "--lora-ckpt", tiny_lora, "--lora-rank", RANK)
    k_left = lora.matrix(L.format(i=0) + "self_attention.k.w_prime_left", RANK, CONFIG["hidden_size"])
    assert not k_left.any() and len(lora.tensors) == 16


def test_every_input_form_gives_the_same_file(tmp_path):
    out = tmp_path / "reference"
    assert run_convert(*base_args(TINY, out)).exit_code == 0
    expected = (out / "model.bin").read_bytes()
    forms = tmp_path / "forms"
    forms.mkdir()
    shutil.copy(TINY / "config.json", forms)
    torch.save(BASE, forms / "pytorch_model.bin")
    result = run_convert(*base_args(forms, tmp_path / "pt", "--ckpt-format", "pytorch"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pt" / "model.bin").read_bytes() == expected
    bf16 = tmp_path / "bf16"
    shutil.copytree(TINY, bf16)
    save_file({k: v.bfloat16() for k, v in BASE.items()}, str(bf16 / "model.safetensors"))
    assert run_convert(*base_args(bf16, tmp_path / "b")).exit_code == 0
    restored = tflite.WeightFile(tmp_path / "b" / "model.bin").vector("params.lm.final_ln.scale")
    assert torch.equal(restored, BASE["model.norm.weight"].bfloat16().float())


def test_python_api_and_default_output_names(tmp_path):
    result = convert(ConversionConfig(
        input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B", output_dir=tmp_path,
        vocab_model_file=TOKENIZER, lora_ckpt=TINY_LORA, lora_rank=RANK,
    ))
    assert result.output == tmp_path / "model.tflite" and result.lora_output == tmp_path / "lora.tflite"
    assert tflite.WeightFile(result.lora_output).metadata[tflite.LORA_RANK] == RANK


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = run_convert(*base_args(TINY, out, "--dry-run", "--lora-ckpt", TINY_LORA, "--lora-rank", RANK))
    assert result.exit_code == 0, result.output
    assert not out.exists()
    lines = result.stdout.splitlines()
    row = next(line for line in lines if "model.layers.0.self_attn.q_proj.weight" in line and ".q.w " in line)
    assert row.split()[2:] == ["64x64", "float32", "int8", "4,096"]
    assert any("params.lm.softmax.logits_ffn.w_quantized_scale" in line for line in lines)
    assert any("lora_A.weight" in line and "w_prime_left" in line and "lora-A" in line for line in lines)
