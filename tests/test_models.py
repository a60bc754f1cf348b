"""Model family data: LlmParameters from config.json, equal to MediaPipe's for the real sizes."""
from __future__ import annotations

import json
import sys

import pytest

from converter.errors import ConversionError
from converter.models import find_model_type
from converter.models.base import dims_from_config
from converter.proto import llm_params_pb2

from .conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import PRESETS, hf_config  # noqa: E402

# The LlmParameters bytes MediaPipe 0.10.21's GPU converter writes for GEMMA_2B
# (shared/reference/mediapipe-format.md, section 4.2, read out of its output file).
MEDIAPIPE_GEMMA_2B = bytes.fromhex(
    "0a3a0801188010208080012880023008381248015a080801100118022001620208016802700178028201080801100118012802"
    "900101b80101c001011080d00f20022a053c656f733e"
)


def parameters_for(preset: str) -> llm_params_pb2.LlmParameters:
    config = hf_config(PRESETS[preset]).to_dict()
    family, model_type = find_model_type(preset)
    return family.parameters(dims_from_config(family, config, "config.json"), config)


def test_gemma_2b_parameters_are_mediapipes_bytes():
    """A real transformers GemmaConfig with GEMMA_2B's sizes gives exactly MediaPipe's bytes."""
    assert parameters_for("GEMMA_2B").SerializeToString() == MEDIAPIPE_GEMMA_2B


def test_gemma_7b_is_multi_head():
    params = parameters_for("GEMMA_7B")
    t = params.transformer_parameters
    assert (t.num_stacks, t.embedding_dim, t.hidden_dimension, t.num_heads, t.num_kv_heads) == (28, 3072, 24576, 16, 0)


def test_tiny_config_dims():
    family, _ = find_model_type("GEMMA_2B")
    dims = dims_from_config(family, json.loads((TINY / "config.json").read_text()), "config.json")
    assert (dims.num_layers, dims.hidden_size, dims.q_size, dims.kv_size, dims.vocab_size) == (2, 64, 64, 16, 512)


def test_head_dim_and_kv_heads_defaults_and_missing_keys():
    family, _ = find_model_type("GEMMA_2B")
    base = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "vocab_size": 32}
    dims = dims_from_config(family, base, "config.json")
    assert dims.head_dim == 16 and dims.num_kv_heads == 4
    with pytest.raises(ConversionError, match="missing vocab_size"):
        dims_from_config(family, {k: v for k, v in base.items() if k != "vocab_size"}, "config.json")


def test_list_models_prints_every_type_from_the_family_data():
    from .conftest import run_convert
    from converter.models import FAMILIES

    result = run_convert("--list-models")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    for family in FAMILIES:
        for model_type in family.model_types:
            line = lines.pop(model_type.name)
            assert line.split()[1] == family.name
            assert ("q_proj" in line) == (bool(family.lora) and model_type.lora), line
            assert ",".join(family.quantizations) in line and ",".join(family.backends) in line
    assert not lines
    assert "none (MediaPipe takes no LoRA" in result.stdout.split("GEMMA_7B")[1].splitlines()[0]


def test_lora_for_gemma_7b_is_refused(tiny, tiny_lora, tmp_path):
    from .conftest import base_args, run_convert

    args = base_args(tiny, tmp_path / "out", "--lora-ckpt", tiny_lora, "--lora-rank", 8)
    args[1] = "GEMMA_7B"
    result = run_convert(*args)
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert message.startswith("error: LoRA is not supported for GEMMA_7B: MediaPipe's runtime takes LoRA only for GEMMA_2B, ")
    assert message.endswith("--merge-lora --merge-unsupported")
    assert "GEMMA_7B" not in message.split("only for")[1] and len(message.splitlines()) == 1
    assert not (tmp_path / "out" / "model.bin").exists()
