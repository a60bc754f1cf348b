"""Train the "LoRA that visibly works" example: a tiny Gemma and a rank-8 attention-only adapter.

The task (the single definition the end-to-end tests assert against):
- the prompt is three consecutive number words, e.g. "four five six";
- the base model continues counting, wrapping after ten: "seven eight nine ten one ...";
- the adapter (q/k/v/o only, r 8, lora_alpha 16 so alpha folding matters) makes the model
  answer "hello world" and stop (<eos>) instead.
Both stages train seconds (about 15 s in all) on one CPU thread with fixed seeds, until every greedy step of
every prompt wins by a wide logit margin (so fp16 GPU runtimes agree with the fp32 reference).

    python scripts/train_tiny_lora.py      # writes fixtures/trained-gemma{,-lora}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import PRESETS, hf_config  # noqa: E402
from make_tokenizer import train as train_tokenizer  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PROMPT_WORDS = 3
LORA_ANSWER = "hello world"
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BOS, EOS = 2, 1
BASE_LENGTH = 24  # longest training sequence (tokens): tests keep the KV cache within it
# Training stops once every greedy step wins by this many logits (fp32). fp16 and int8 move these
# tiny models' logits by hundredths; the adapter's first token is bounded by the base's embeddings.
BASE_MARGIN, ADAPTER_MARGIN = 8.0, 4.0


def prompts() -> list[str]:
    """Every prompt of the task: three consecutive number words, from each starting number."""
    return [" ".join(NUMBERS[(start + i) % len(NUMBERS)] for i in range(PROMPT_WORDS)) for start in range(len(NUMBERS))]


def base_answer(prompt: str, words: int) -> str:
    """What the base model says: the next `words` numbers after the prompt's last one."""
    last = NUMBERS.index(prompt.split()[-1])
    return " ".join(NUMBERS[(last + 1 + i) % len(NUMBERS)] for i in range(words))


def lora_answer(prompt: str) -> str:
    """What the model with the adapter says (then it stops)."""
    return LORA_ANSWER


def base_sequences(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counting runs from every start, and the greeting the adapter will reuse ("hello world",
    <eos>). Every token is a target, the first word too (so that "hello" has a trained output
    embedding for the adapter to reach); the margin is checked after the first word only.
    Returns inputs, targets and the mask of positions whose margin counts; padding is ignored."""
    rows = []
    for start in range(len(NUMBERS)):
        words = [NUMBERS[(start + i) % len(NUMBERS)] for i in range(BASE_LENGTH - 1)]
        rows.append([BOS] + tokenizer.encode(" ".join(words)))
    rows.append([BOS] + tokenizer.encode(LORA_ANSWER) + [EOS])
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    targets = ids[:, 1:].clone()
    for i, row in enumerate(rows):
        targets[i, len(row) - 1:] = -100
    checked = targets != -100
    checked[:, 0] = False  # the first word is the user's choice, not predictable
    return ids[:, :-1], targets, checked


def lora_sequences(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt followed by the adapter's answer and <eos>; loss on the answer only."""
    rows, masks = [], []
    for prompt in prompts():
        prompt_ids = [BOS] + tokenizer.encode(prompt)
        answer_ids = tokenizer.encode(lora_answer(prompt)) + [EOS]
        rows.append(prompt_ids + answer_ids)
        masks.append([False] * len(prompt_ids) + [True] * len(answer_ids))
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    targets = torch.where(mask, ids, torch.full_like(ids, -100))[:, 1:]
    return ids[:, :-1], targets, targets != -100


def margins(model, ids: torch.Tensor, targets: torch.Tensor, checked: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other logit, at the checked positions."""
    with torch.no_grad():
        logits = model(ids).logits
    logits, wanted = logits[checked], targets[checked]
    target = logits.gather(1, wanted[:, None])[:, 0]
    others = logits.scatter(1, wanted[:, None], float("-inf")).max(1).values
    return target - others


def fit(model, parameters, ids, targets, checked, steps: int, lr: float, margin: float, label: str) -> None:
    """Adam on cross-entropy until every checked position wins by `margin` (or `steps` run out)."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for step in range(steps):
        logits = model(ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 24 and margins(model, ids, targets, checked).min() > margin:
            break
    smallest = float(margins(model, ids, targets, checked).min())
    click.echo(f"{label}: {step + 1} steps, loss {loss.item():.4f}, smallest margin {smallest:.2f}")
    if smallest < margin:
        raise click.ClickException(f"{label} did not reach a {margin} logit margin")


def train_base(tokenizer, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(PRESETS["TINY_GEMMA"]))
    model.train()
    fit(model, model.parameters(), *base_sequences(tokenizer), steps=1500, lr=3e-3, margin=BASE_MARGIN, label="base")
    return model.eval()


def train_adapter(model, tokenizer, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    fit(peft_model, trainable, *lora_sequences(tokenizer), steps=1500, lr=3e-3, margin=ADAPTER_MARGIN, label="adapter")
    return peft_model.eval()


def save_adapter(peft_model, folder: Path) -> None:
    """PEFT's files, reproducibly: target_modules sorted (PEFT writes a set), no model card."""
    peft_model.save_pretrained(str(folder))
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=FIXTURES, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(out: Path, seed: int) -> None:
    import sentencepiece as spm

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model_dir, adapter_dir = out / "trained-gemma", out / "trained-gemma-lora"
    train_tokenizer(model_dir / "tokenizer.model", PRESETS["TINY_GEMMA"]["vocab_size"], seed)
    tokenizer = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    model = train_base(tokenizer, seed)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    peft_model = train_adapter(model, tokenizer, seed)
    save_adapter(peft_model, adapter_dir)
    click.echo(f"wrote {model_dir} and {adapter_dir}")


if __name__ == "__main__":
    main()
