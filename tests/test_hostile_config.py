"""Hostile config.json values, special tokens, the tokenizer size rule and an untied Gemma lm_head:
one `error:` line naming config.json and the key (or the tensor / tokenizer), exit 1, nothing
written; the checkpoint's own special tokens used or reported; correct inputs still convert."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2 as spm_pb

from bundler.cli import main as bundle_main
from converter import tflite
from converter.proto import llm_params_pb2

from .conftest import TOKENIZER, base_args, run_convert

GEMMA2 = {"model_type": "gemma2"}
GEMMA3 = {"model_type": "gemma3_text", "query_pre_attn_scalar": 16}
PHI = {"model_type": "phi", "head_dim": None, "num_key_value_heads": None, "partial_rotary_factor": 0.4}
FALCON = {"model_type": "falcon", "head_dim": None, "num_key_value_heads": None}
TYPES = {"gemma2": "GEMMA2_2B", "gemma3_text": "GEMMA3_1B", "gemma3": "GEMMA3_4B", "phi": "PHI_2",
         "falcon": "FALCON_RW_1B"}


def nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


# case: (config.json changes, words the error line must hold)
HOSTILE = {
    "layers null": ({"num_hidden_layers": None}, ["config.json", "missing num_hidden_layers"]),
    "layers string": ({"num_hidden_layers": "2"}, ["config.json", "num_hidden_layers", "integer", "'2'"]),
    "layers bool": ({"num_hidden_layers": True}, ["num_hidden_layers", "True"]),
    "layers float": ({"num_hidden_layers": 2.0}, ["num_hidden_layers", "2.0"]),
    "layers 10^12": ({"num_hidden_layers": 10**12}, ["num_hidden_layers", "from 1 to 4096"]),
    "hidden 2^40": ({"hidden_size": 2**40}, ["hidden_size", str(2**40)]),
    "vocab 0": ({"vocab_size": 0}, ["vocab_size", "got 0"]),
    "vocab negative": ({"vocab_size": -512}, ["vocab_size", "-512"]),
    "ffn list": ({"intermediate_size": [256]}, ["intermediate_size", "[256]"]),
    "ffn deep nesting": ({"intermediate_size": nested(400)}, ["intermediate_size", "..."]),
    "ffn object": ({"intermediate_size": {"a": 1}}, ["intermediate_size"]),
    "too many parameters": ({"intermediate_size": 2**24, "num_hidden_layers": 4096},
                            ["parameters", "more than"]),
    "kv heads do not divide": ({"num_key_value_heads": 3}, ["num_key_value_heads 3", "does not divide",
                                                              "num_attention_heads 4"]),
    "kv heads above heads": ({"num_key_value_heads": 8}, ["num_key_value_heads 8", "does not divide"]),
    "odd head_dim": ({"head_dim": 15}, ["head_dim 15", "rotary"]),
    "hidden not heads x head_dim": ({"head_dim": None, "hidden_size": 66}, ["hidden_size 66", "head_dim 16"]),
    "eps zero": ({"rms_norm_eps": 0}, ["rms_norm_eps", "above 0"]),
    "eps NaN": ({"rms_norm_eps": math.nan}, ["rms_norm_eps", "nan"]),
    "eps string": ({"rms_norm_eps": "1e-6"}, ["rms_norm_eps", "'1e-6'"]),
    "eps null": ({"rms_norm_eps": None}, ["rms_norm_eps", "None"]),
    "rope_parameters list": ({"rope_parameters": [1, 2]}, ["rope_parameters", "JSON object"]),
    "rope_theta NaN": ({"rope_parameters": {"rope_theta": math.nan}}, ["rope_theta", "nan"]),
    "rope_theta negative": ({"rope_parameters": {"rope_theta": -10000.0}}, ["rope_theta", "-10000"]),
    "activation list": ({"hidden_activation": ["gelu"]}, ["hidden_activation", "string"]),
    "rope_scaling list": ({"rope_scaling": [{"type": "linear"}]}, ["rope_scaling"]),
    "model_type list": ({"model_type": ["gemma"]}, ["model_type", "['gemma']"]),
    # Gemma 2
    "attn soft cap NaN": ({**GEMMA2, "attn_logit_softcapping": math.nan}, ["attn_logit_softcapping", "nan"]),
    "final soft cap Inf": ({**GEMMA2, "final_logit_softcapping": math.inf}, ["final_logit_softcapping", "inf"]),
    "soft cap negative": ({**GEMMA2, "attn_logit_softcapping": -50.0}, ["attn_logit_softcapping", "-50"]),
    "soft cap zero": ({**GEMMA2, "final_logit_softcapping": 0}, ["final_logit_softcapping", "above 0"]),
    "soft cap string": ({**GEMMA2, "attn_logit_softcapping": "50"}, ["attn_logit_softcapping", "'50'"]),
    "query scalar NaN": ({**GEMMA2, "query_pre_attn_scalar": math.nan}, ["query_pre_attn_scalar", "nan"]),
    # Gemma 3
    "sliding window negative": ({**GEMMA3, "sliding_window": -1}, ["sliding_window", "-1"]),
    "sliding window zero": ({**GEMMA3, "sliding_window": 0}, ["sliding_window", "got 0"]),
    "sliding window null": ({**GEMMA3, "sliding_window": None}, ["sliding_window", "None"]),
    "sliding window float": ({**GEMMA3, "sliding_window": 4.5}, ["sliding_window", "4.5"]),
    "window pattern zero": ({**GEMMA3, "sliding_window_pattern": 0}, ["sliding_window_pattern", "got 0"]),
    "layer_types string": ({**GEMMA3, "layer_types": "full_attention"}, ["layer_types", "list of strings"]),
    "bidirectional string": ({**GEMMA3, "use_bidirectional_attention": "yes"}, ["use_bidirectional_attention"]),
    "global factor NaN": ({**GEMMA3, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": math.nan, "rope_theta": 1e6}}}, ["factor", "nan"]),
    "global rope_theta past float32": ({**GEMMA3, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1e39}}}, ["global_rope_wavelength", "inf"]),
    "per-type rope list": ({**GEMMA3, "rope_parameters": {"full_attention": [1]}}, ["full_attention", "JSON object"]),
    "rope_type list": ({**GEMMA3, "rope_parameters": {"full_attention": {"rope_type": ["linear"]}}},
                       ["rope_type", "string"]),
    "text_config list": ({"model_type": "gemma3", "text_config": [1]}, ["text_config", "JSON object"]),
    # Phi-2 and Falcon-RW
    "phi rotary factor NaN": ({**PHI, "partial_rotary_factor": math.nan}, ["partial_rotary_factor", "nan"]),
    "phi rope_parameters string": ({**PHI, "rope_parameters": "x"}, ["rope_parameters", "JSON object"]),
    "phi bos bool": ({**PHI, "bos_token_id": True}, ["bos_token_id", "True"]),
    "phi hidden not divisible": ({**PHI, "hidden_size": 66}, ["hidden_size 66"]),
    "falcon eps NaN": ({**FALCON, "alibi": True, "parallel_attn": False, "multi_query": False, "bias": True,
                        "layer_norm_epsilon": math.nan}, ["layer_norm_epsilon", "nan"]),
}


def set_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_one_error(result, words, out: Path) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and len(lines[0]) < 400, lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return lines[0]


def convert_args(tiny: Path, out: Path, model_type: str = "GEMMA_2B", *extra) -> list:
    args = base_args(tiny, out, *extra)
    args[args.index("GEMMA_2B")] = model_type
    return args


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_config_value_is_one_line_naming_the_key(case, tiny, tmp_path):
    changes, words = HOSTILE[case]
    set_config(tiny, **changes)
    config = json.loads((tiny / "config.json").read_text())
    model_type = TYPES.get(config["model_type"], "GEMMA_2B") if isinstance(config["model_type"], str) else "GEMMA_2B"
    out = tmp_path / "out"
    assert_one_error(run_convert(*convert_args(tiny, out, model_type)), words, out)
    assert_one_error(run_convert(*convert_args(tiny, out, model_type, "--dry-run")), words, out)


def parameters(path: Path) -> llm_params_pb2.LlmParameters:
    return llm_params_pb2.LlmParameters.FromString(tflite.WeightFile(path).metadata[tflite.LLM_PARAMETERS])


def test_valid_values_of_every_kind_still_convert(tiny, tmp_path):
    """Ints, finite floats, nulls where they mean "default", Gemma's rotary base written as 1e4 and
    eos ids as a list."""
    set_config(tiny, rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1e4, "rope_type": "default"},
               num_key_value_heads=1, hidden_activation=None, rope_scaling=None, eos_token_id=[1])
    out = tmp_path / "out"
    result = run_convert(*convert_args(tiny, out))
    assert result.exit_code == 0, result.output
    params = parameters(out / "model.bin")
    assert params.transformer_parameters.num_kv_heads == 1 and params.start_token_id == 2
    assert list(params.stop_tokens) == ["<eos>"] and result.stderr == ""


def chatml_tokenizer(path: Path) -> Path:
    """The tiny tokenizer with its last two pieces replaced by ChatML's tokens, added as user-defined
    pieces (what a fine-tune's tokenizer.model holds), keeping the 512-row vocabulary."""
    proto = spm_pb.ModelProto.FromString(TOKENIZER.read_bytes())
    for index, token in ((510, "<|im_start|>"), (511, "<|im_end|>")):
        proto.pieces[index].piece = token
        proto.pieces[index].type = spm_pb.ModelProto.SentencePiece.USER_DEFINED
    path.write_bytes(proto.SerializeToString())
    return path


def test_checkpoint_special_tokens_are_used_and_said(tiny, tmp_path):
    """A ChatML fine-tune: bos/eos <|im_start|>/<|im_end|> in config.json and generation_config.json."""
    tokenizer = chatml_tokenizer(tmp_path / "chatml.model")
    set_config(tiny, bos_token_id=510, eos_token_id=511)
    generation = json.loads((tiny / "generation_config.json").read_text())
    (tiny / "generation_config.json").write_text(json.dumps({**generation, "bos_token_id": 510,
                                                             "eos_token_id": [1, 511]}))
    out = tmp_path / "out"
    args = base_args(tiny, out)
    args[args.index(TOKENIZER)] = tokenizer
    args.remove("--quiet")
    result = run_convert(*args)
    assert result.exit_code == 0, result.output
    params = parameters(out / "model.bin")
    assert params.start_token_id == 510 and list(params.stop_tokens) == ["<eos>", "<|im_end|>"]
    assert "note: start token '<|im_start|>' (id 510) from generation_config.json bos_token_id" in result.stderr
    assert "note: stop token '<|im_end|>' (id 511)" in result.stderr and "warning" not in result.stderr
    # the same checkpoint with the default tokens writes MediaPipe's defaults, silently
    set_config(tiny, bos_token_id=2, eos_token_id=1)
    (tiny / "generation_config.json").write_text(json.dumps(generation))
    result = run_convert(*args)
    assert result.exit_code == 0 and "note" not in result.stderr, result.output
    params = parameters(out / "model.bin")
    assert params.start_token_id == 2 and list(params.stop_tokens) == ["<eos>"]


def test_a_plain_piece_named_as_stop_token_is_reported_not_used(tiny, tmp_path):
    (tiny / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end_of_turn>"}}))
    set_config(tiny, eos_token_id=300)
    out = tmp_path / "out"
    result = run_convert(*base_args(tiny, out))
    assert result.exit_code == 0, result.output
    assert "warning: config.json eos_token_id names" in result.stderr and "(id 300)" in result.stderr
    assert list(parameters(out / "model.bin").stop_tokens) == ["<eos>", "<end_of_turn>"]  # user-defined: used


@pytest.mark.parametrize("file,changes,words", [
    ("config.json", {"eos_token_id": "</s>"}, ["config.json", "eos_token_id", "'</s>'"]),
    ("config.json", {"bos_token_id": 512}, ["config.json", "bos_token_id", "below the vocabulary size 512"]),
    ("generation_config.json", {"eos_token_id": [1, -3]}, ["generation_config.json", "eos_token_id", "-3"]),
    ("generation_config.json", {"bos_token_id": 2.0}, ["generation_config.json", "bos_token_id", "2.0"]),
    ("tokenizer_config.json", {"eos_token": 7}, ["tokenizer_config.json", "eos_token", "7"]),
    ("generation_config.json", [1], ["generation_config.json", "JSON object"]),
])
def test_bad_special_token_values_are_one_line(tiny, tmp_path, file, changes, words):
    path = tiny / file
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **changes} if isinstance(changes, dict) else changes))
    out = tmp_path / "out"
    assert_one_error(run_convert(*base_args(tiny, out)), words, out)


def short_tokenizer(path: Path, pieces: int) -> Path:
    proto = spm_pb.ModelProto.FromString(TOKENIZER.read_bytes())
    del proto.pieces[pieces:]
    path.write_bytes(proto.SerializeToString())
    return path


def test_converter_and_bundler_apply_one_tokenizer_size_rule(tiny, tmp_path):
    short = short_tokenizer(tmp_path / "short.model", 500)
    out = tmp_path / "out"
    args = base_args(tiny, out)
    args[args.index(TOKENIZER)] = short
    line = assert_one_error(run_convert(*args), [f"--vocab-model-file {short} has 500 pieces",
                                                 "vocabulary of 512", "expected a tokenizer of 512 pieces"], out)
    result = run_convert(*base_args(tiny, out))
    assert result.exit_code == 0, result.output
    bundle = CliRunner().invoke(bundle_main, ["--tflite-model", str(out / "model.bin"), "--tokenizer-model", str(short),
                                              "--start-token", "<bos>", "--stop-tokens", "<eos>",
                                              "--output-filename", str(tmp_path / "b" / "x.task")])
    assert bundle.exit_code == 1 and bundle.stderr.count("\n") == 1, bundle.output
    assert bundle.stderr.strip().split(" has ", 1)[1] == line.split(" has ", 1)[1].replace("the model", str(out / "model.bin"))
    assert not (tmp_path / "b" / "x.task").exists()


def add_lm_head(folder: Path, noise: float) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    embedding = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding + noise * torch.ones_like(embedding)
    save_file(tensors, str(path))


def test_untied_gemma_lm_head_is_refused_not_dropped(tiny, tmp_path):
    add_lm_head(tiny, 0.01)
    before = (tiny / "model.safetensors").read_bytes()
    out = tmp_path / "out"
    assert_one_error(run_convert(*base_args(tiny, out)), ["lm_head.weight differs from model.embed_tokens.weight",
                                                          "tied embeddings", "untied"], out)
    assert (tiny / "model.safetensors").read_bytes() == before


def test_lm_head_saved_tied_is_accepted(tiny, tmp_path):
    add_lm_head(tiny, 0.0)
    out = tmp_path / "out"
    result = run_convert(*base_args(tiny, out))
    assert result.exit_code == 0, result.output
    assert "params.lm.softmax.logits_ffn.w" in tflite.WeightFile(out / "model.bin").tensors
