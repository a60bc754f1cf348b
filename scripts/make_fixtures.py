"""Regenerate fixtures/: a tiny random Gemma written by transformers, a PEFT LoRA adapter
made by peft, and a SentencePiece tokenizer trained on generated text.

    python scripts/make_fixtures.py            # writes fixtures/tiny-gemma{,-lora}
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import PRESETS, hf_config  # noqa: E402
from make_tokenizer import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "fixtures"


def make_model(out: Path, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(PRESETS["TINY_GEMMA"])
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initializes norms to zeros/ones; make them informative
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    return model


def make_adapter(model, out: Path, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    config = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=ROOT, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(out: Path, seed: int) -> None:
    model_dir, adapter_dir = out / "tiny-gemma", out / "tiny-gemma-lora"
    model = make_model(model_dir, seed)
    train(model_dir / "tokenizer.model", PRESETS["TINY_GEMMA"]["vocab_size"], seed)
    make_adapter(model, adapter_dir, seed)
    click.echo(f"wrote {model_dir} and {adapter_dir}")


if __name__ == "__main__":
    main()
