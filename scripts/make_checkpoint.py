"""Generate a deterministic random-weight Hugging Face checkpoint (and PEFT adapter).

Shapes come from transformers itself (the model is built on the meta device), so the
tensor names and shapes are exactly what a real checkpoint of that architecture has.
Each tensor is seeded from its own name, so any single tensor can be regenerated
without the rest. Real shapes (e.g. GEMMA_2B, ~5 GB) are written shard by shard and
never held in memory at once.

    python scripts/make_checkpoint.py --preset GEMMA_2B --out /tmp/gemma-2b --lora-rank 8
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

# Hugging Face configs with the real shapes of each model type (random weights).
PRESETS: dict[str, dict] = {
    "GEMMA_2B": dict(
        model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
        num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
    ),
    "GEMMA_7B": dict(
        model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
    ),
    "GEMMA2_2B": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    ),
    "GEMMA3_300M": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
    ),
    "GEMMA3_1B": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
    ),
    "TINY_GEMMA": dict(
        model_type="gemma", vocab_size=512, hidden_size=64, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
    ),
    # Tiny models that exercise every setting: GQA, head_dim != hidden/heads, soft caps that bite,
    # queries scaled by 1/sqrt(hidden/heads); Gemma 3: a global layer among sliding-window layers
    # with a window shorter than the test prompts, and linear scaling of the global rotary base.
    "TINY_GEMMA2": dict(
        model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=16,
        attn_logit_softcapping=0.1, final_logit_softcapping=0.3,
    ),
    "TINY_GEMMA3": dict(
        model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    ),
}
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Phi-2, Falcon-RW and StableLM (real shapes of MediaPipe's PHI_2, FALCON_RW_1B, STABLELM_4E1T_3B).
PRESETS.update({
    "PHI_2": dict(
        model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, partial_rotary_factor=0.4, bos_token_id=50256, eos_token_id=50256,
    ),
    "FALCON_RW_1B": dict(
        model_type="falcon", vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        alibi=True, bias=True, multi_query=False, parallel_attn=False, new_decoder_architecture=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "STABLELM_4E1T_3B": dict(
        model_type="stablelm", vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.25, bos_token_id=0, eos_token_id=0,
    ),
})
LORA_TARGETS = {"PHI_2": ("q_proj", "k_proj", "v_proj", "dense")}  # others: ATTENTION_TARGETS
PYTORCH_PRESETS = ("FALCON_RW_1B",)  # falcon-rw-1b ships one PyTorch pytorch_model.bin, lm_head included


def write_pytorch(shapes: dict[str, tuple[int, ...]], out: Path, seed: int, dtype: torch.dtype, tied: dict) -> None:
    """One `pytorch_model.bin` state dict; tied tensors share storage, as torch.save writes them."""
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        tensors[name] = tensors[tied[name]] if name in tied else random_tensor(name, shape, seed, dtype)
    torch.save(tensors, str(out / "pytorch_model.bin"))


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed derived from the global seed and the tensor name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Random weights: N(0, 0.02) for matrices, N(0, 0.1) for norm vectors."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    std = 0.02 if len(shape) > 1 else 0.1
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def hf_config(preset: dict):
    from transformers import AutoConfig

    values = dict(preset)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def model_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the checkpoint tensors, from transformers' own model code."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def write_sharded(
    shapes: dict[str, tuple[int, ...]], out: Path, seed: int, dtype: torch.dtype,
    shard_bytes: int, prefix: str = "model",
) -> None:
    """Write tensors into safetensors shards of about shard_bytes each (+ index if >1)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    count = len(shards)
    weight_map = {}
    for index, names in enumerate(shards, 1):
        file = f"{prefix}.safetensors" if count == 1 else f"{prefix}-{index:05d}-of-{count:05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], seed, dtype) for name in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
        del tensors
    if count > 1:
        total = sum(torch.Size(s).numel() * dtype.itemsize for s in shapes.values())
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{prefix}.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def lora_shapes(shapes: dict[str, tuple[int, ...]], rank: int, targets: tuple[str, ...]) -> dict:
    """PEFT adapter tensor names and shapes for the given target modules."""
    result = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if len(shape) == 2 and module.rsplit(".", 1)[-1] in targets:
            out_features, in_features = shape
            result[f"base_model.model.{module}.lora_A.weight"] = (rank, in_features)
            result[f"base_model.model.{module}.lora_B.weight"] = (out_features, rank)
    return result


def write_adapter(
    shapes: dict, out: Path, rank: int, alpha: float, targets: tuple[str, ...], seed: int,
    dtype: torch.dtype,
) -> None:
    from peft import LoraConfig

    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM").save_pretrained(str(out))
    tensors = {
        name: random_tensor(name, shape, seed + 1, dtype) for name, shape in lora_shapes(shapes, rank, targets).items()
    }
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


@click.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to create.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--shard-gb", default=2.0, show_default=True, help="Approximate shard size.")
@click.option("--lora-rank", type=int, default=None, help="Also write a PEFT adapter (q/k/v/o) of this rank.")
@click.option("--lora-alpha", type=float, default=None, help="Adapter alpha (default: 2 x rank).")
@click.option("--lora-out", type=click.Path(path_type=Path), default=None, help="Adapter folder (default: <out>-lora).")
def main(preset, out, seed, dtype, shard_gb, lora_rank, lora_alpha, lora_out) -> None:
    torch_dtype = getattr(torch, dtype)
    config = hf_config(PRESETS[preset])
    config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    shapes = model_shapes(config)
    if preset in PYTORCH_PRESETS:
        shapes["lm_head.weight"] = shapes["transformer.word_embeddings.weight"]
        write_pytorch(shapes, out, seed, torch_dtype, {"lm_head.weight": "transformer.word_embeddings.weight"})
    else:
        write_sharded(shapes, out, seed, torch_dtype, int(shard_gb * 2**30))
    if lora_rank:
        alpha = lora_alpha if lora_alpha is not None else 2.0 * lora_rank
        targets = LORA_TARGETS.get(preset, ATTENTION_TARGETS)
        write_adapter(shapes, lora_out or Path(f"{out}-lora"), lora_rank, alpha, targets, seed, torch_dtype)
    click.echo(f"wrote {preset} checkpoint to {out}")


if __name__ == "__main__":
    main()
