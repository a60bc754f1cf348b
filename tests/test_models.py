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
