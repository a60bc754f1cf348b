"""A LoRA that visibly works: the trained example, converted -> bundled -> run.

The expected text comes from the task definition in scripts/train_tiny_lora.py (the base counts
on, the adapter answers "hello world"), never from our own output.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from harness.generate import Options, generate, load

from .trained import (GENERATED, MAX_TOKENS, TRAINED_LORA, TRAINED_TOKENIZER, bundle, convert, hf_greedy, hf_model,
                      task)

GREEDY = Options(max_tokens=MAX_TOKENS, top_k=1, temperature=0.0)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, Path]:
    """The trained base and adapter through `python -m converter.cli` and `python -m bundler.cli`."""
    out = tmp_path_factory.mktemp("trained")
    base, lora = convert(out, lora=TRAINED_LORA)
    return {"bin": base, "lora": lora, "task": bundle(base, out / "trained.task"),
            "litertlm": bundle(base, out / "trained.litertlm", "litertlm")}


def test_the_fixtures_do_the_task_in_transformers_and_peft():
    """The checked-in checkpoint and adapter are what the script says, by wide logit margins."""
    tokenizer = spm.SentencePieceProcessor(model_file=str(TRAINED_TOKENIZER))
    base, tuned = hf_model(), hf_model(TRAINED_LORA)
    assert tuned.peft_config["default"].lora_alpha != tuned.peft_config["default"].r
    assert sorted(tuned.peft_config["default"].target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    for prompt in task.prompts():
        plain, answer = hf_greedy(base, tokenizer, prompt), hf_greedy(tuned, tokenizer, prompt)
        assert plain.text == task.base_answer(prompt, GENERATED) and plain.margin > 4, (prompt, plain)
        assert answer.text == task.lora_answer(prompt) and answer.margin > 2, (prompt, answer)


def test_reference_runtime_counts_without_the_adapter_and_answers_with_it(example):
    base, tuned = load(example["task"]), load(example["task"], example["lora"])
    for prompt in task.prompts():
        assert generate(base, prompt, GREEDY).text == task.base_answer(prompt, GENERATED), prompt
        answer = generate(tuned, prompt, GREEDY)
        assert answer.text == task.lora_answer(prompt), prompt
        assert len(answer.ids) == len(tuned.tokenizer.encode(task.LORA_ANSWER))  # then <eos> stopped it


@pytest.mark.runtime
def test_litertlm_counts_without_the_adapter_and_answers_with_it(example):
    """LiteRT-LM's GPU executor on our .litertlm and LoRA .bin: the task's answers, which are also
    the reference runtime's greedy tokens."""
    from .test_bundler import run_litertlm

    prompts = task.prompts()[::3]
    runtime = run_litertlm(example["litertlm"], prompts, MAX_TOKENS, example["lora"])
    base, tuned = load(example["bin"]), load(example["bin"], example["lora"])
    for prompt, runtime_base, runtime_lora in zip(prompts, runtime["base"], runtime["lora"], strict=True):
        reference_base, reference_lora = generate(base, prompt, GREEDY).text, generate(tuned, prompt, GREEDY).text
        assert runtime_base == reference_base == task.base_answer(prompt, GENERATED), prompt
        assert runtime_lora == reference_lora == task.lora_answer(prompt), prompt
