"""Peak memory does not grow with model size: conversions stream tensor by tensor, chunk by chunk."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, padded_tokenizer

pytestmark = pytest.mark.slow
SIZES = {  # Gemma-shaped bf16 checkpoints: ~0.2 GB and ~0.8 GB
    "small": dict(num_hidden_layers=2, hidden_size=1024, intermediate_size=8192, vocab_size=32768),
    "large": dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=8192, vocab_size=131072),
}


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_checkpoint(folder: Path, size: dict) -> None:
    code = (
        "import sys, torch; sys.path.insert(0, 'scripts');"
        "from make_checkpoint import hf_config, model_shapes, write_adapter, write_sharded;"
        f"c = hf_config(dict(model_type='gemma', num_attention_heads=8, num_key_value_heads=1, head_dim=128, **{size!r}));"
        f"c.save_pretrained({str(folder)!r});"
        f"write_sharded(model_shapes(c), __import__('pathlib').Path({str(folder)!r}), 0, torch.bfloat16, 2**28);"
        f"write_adapter(model_shapes(c), __import__('pathlib').Path({str(folder)!r} + '-lora'), 8, 16.0, {ALL_LINEAR!r},"
        " 0, torch.bfloat16)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


def peak_rss(command: list[str]) -> int:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, process.stderr.read().decode()
    return usage.ru_maxrss * 1024


def test_peak_rss_is_flat_in_model_size(tmp_path):
    peaks = {}
    for name, size in SIZES.items():
        folder = tmp_path / name
        make_checkpoint(folder, size)
        tokenizer = padded_tokenizer(tmp_path / f"{name}.model", size["vocab_size"])
        command = [sys.executable, "-m", "converter.cli", "--model-type", "GEMMA_2B", "--input-ckpt", str(folder),
                   "--vocab-model-file", str(tokenizer), "--output-dir", str(tmp_path / f"{name}-out"), "--quiet"]
        peaks[name] = peak_rss(command)
        # --merge-lora: every linear tensor merged with an all-linear adapter, read chunk by chunk too
        peaks[f"{name} merged"] = peak_rss(command[:-2] + [str(tmp_path / f"{name}-merged"), "--quiet", "--lora-ckpt",
                                                         f"{folder}-lora", "--merge-lora"])
        inputs = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        assert inputs > 150e6
    imports = peak_rss([sys.executable, "-c", "import converter.cli, converter.convert"])
    # 4x the weights, the same peak: what is resident is the interpreter plus a few chunks.
    assert peaks["large"] - peaks["small"] < 48 * 2**20, peaks
    assert peaks["large"] - imports < 160 * 2**20, (peaks, imports)
    assert peaks["large merged"] - peaks["small merged"] < 48 * 2**20, peaks
    assert peaks["large merged"] - imports < 160 * 2**20, (peaks, imports)
