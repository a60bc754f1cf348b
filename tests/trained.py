"""Helpers for the tests on the trained example (fixtures/trained-gemma{,-lora}, made by
scripts/train_tiny_lora.py, whose task definition the tests assert against) and on seeded random
adapters for it, with transformers + PEFT greedy decoding (and its logit margins) as the truth."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .conftest import FIXTURES, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import train_tiny_lora as task  # noqa: E402

TRAINED = FIXTURES / "trained-gemma"
TRAINED_LORA = FIXTURES / "trained-gemma-lora"
TRAINED_TOKENIZER = TRAINED / "tokenizer.model"
MAX_TOKENS = 16  # maxTokens (KV cache): <bos> + 3 prompt words + 12 generated
GENERATED = MAX_TOKENS - 1 - task.PROMPT_WORDS


def run_module(*args, timeout: float = 300) -> None:
    """`python -m <module> ...` from the repository root, as a user runs it; fails with its stderr."""
    process = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
    assert process.returncode == 0, process.stderr[-3000:]


def convert(out: Path, checkpoint: Path = TRAINED, lora: Path | None = None, rank: int = 8) -> tuple[Path, Path | None]:
    """`python -m converter.cli` (int8, the default): (base .bin, LoRA .bin or None)."""
    args = ["converter.cli", "--model-type", "GEMMA_2B", "--input-ckpt", checkpoint, "--vocab-model-file",
            TRAINED_TOKENIZER, "--output-dir", out, "--output-tflite-file", out / "base.bin", "--quiet"]
    if lora is not None:
        args += ["--lora-ckpt", lora, "--lora-rank", rank, "--lora-output-tflite-file", out / "lora.bin"]
    run_module(*args)
    return out / "base.bin", (out / "lora.bin" if lora is not None else None)


def bundle(model: Path, out: Path, fmt: str = "task") -> Path:
    """`python -m bundler.cli` without a prompt template (the runtimes then see the raw prompt)."""
    run_module("bundler.cli", "--tflite-model", model, "--tokenizer-model", TRAINED_TOKENIZER,
               "--start-token", "<bos>", "--stop-tokens", "<eos>", "--output-filename", out, "--format", fmt)
    return out


@dataclass(frozen=True)
class RandomAdapter:
    """A seeded random PEFT adapter on the trained model: N(0, 0.1) A, N(0, b_std) B."""

    targets: tuple[str, ...]
    seed: int
    b_std: float
    alpha: int
    rank: int = 8


def write_adapter(spec: RandomAdapter, folder: Path) -> Path:
    """The adapter as PEFT saves it (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(TRAINED))
    sizes = {"q_proj": (config.hidden_size, config.num_attention_heads * config.head_dim),
             "k_proj": (config.hidden_size, config.num_key_value_heads * config.head_dim),
             "v_proj": (config.hidden_size, config.num_key_value_heads * config.head_dim),
             "o_proj": (config.num_attention_heads * config.head_dim, config.hidden_size),
             "gate_proj": (config.hidden_size, config.intermediate_size),
             "up_proj": (config.hidden_size, config.intermediate_size),
             "down_proj": (config.intermediate_size, config.hidden_size)}
    generator = torch.Generator().manual_seed(spec.seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in spec.targets:
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"base_model.model.model.layers.{layer}.{block}.{module}"
            in_features, out_features = sizes[module]
            tensors[f"{name}.lora_A.weight"] = torch.randn(spec.rank, in_features, generator=generator) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_features, spec.rank, generator=generator) * spec.b_std
    LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
               task_type="CAUSAL_LM").save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def hf_model(adapter: Path | None = None, alpha: int | None = None):
    """transformers' fp32 trained model, with the PEFT adapter when given (alpha overridable, to
    show what an unfolded alpha would have generated)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TRAINED), dtype=torch.float32).eval()
    if adapter is None:
        return model
    config = PeftConfig.from_pretrained(str(adapter))
    if alpha is not None:
        config.lora_alpha = alpha
    return PeftModel.from_pretrained(model, str(adapter), config=config).eval()


@dataclass(frozen=True)
class Greedy:
    ids: list[int]
    text: str
    margin: float  # smallest top-1 minus top-2 logit over the steps: a flip below ~0.05 is fp16 noise


def hf_greedy(model, tokenizer, prompt: str, max_tokens: int = MAX_TOKENS) -> Greedy:
    """Greedy decoding as the runtimes do it: <bos> + prompt, until <eos> or the KV cache is full."""
    ids = [task.BOS] + tokenizer.encode(prompt)
    out, margins = [], []
    with torch.no_grad():
        while len(ids) < max_tokens:
            top = model(torch.tensor([ids])).logits[0, -1].topk(2)
            margins.append(float(top.values[0] - top.values[1]))
            token = int(top.indices[0])
            if token == task.EOS:
                break
            out.append(token)
            ids.append(token)
    return Greedy(out, tokenizer.decode(out), min(margins))
