"""The real MediaPipe web runtime (@mediapipe/tasks-genai in headless Chromium, WebGPU on
SwiftShader) runs our files: the trained example's base and adapter, a base-only .task, and the
LoRA facts the converter relies on (plain o_proj encoding, gate/up/down LoRA, alpha folded by us),
each checked against transformers + PEFT greedy decoding, with the reference logit margins checked
so that a flip from fp16 rounding would be reported as such.

One browser serves the whole module. Skipped without Chromium or the npm package (scripts/
setup_web.sh) unless REQUIRE_WEB is set (scripts/test.sh sets it).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import sentencepiece as spm

from converter.runtime_options import RuntimeOptions
from harness.generate import generate, load
from harness.web_runtime import Timeouts, WebRuntime, WebRuntimeError, missing

from .conftest import ROOT
from .trained import (GENERATED, MAX_TOKENS, TRAINED_LORA, TRAINED_TOKENIZER, RandomAdapter, bundle, convert,
                      hf_greedy, hf_model, task, write_adapter)

pytestmark = pytest.mark.web

GREEDY = RuntimeOptions(max_tokens=MAX_TOKENS, top_k=1, temperature=0.0, random_seed=0)
# Smallest top-1 minus top-2 logit (transformers fp32) accepted on a compared greedy path: the
# runtime computes in fp16 from int8 weights, which moves these logits by a few hundredths.
MIN_MARGIN = 0.3

# Seeded random adapters on the trained model and prompts where they change the output clearly.
ADAPTERS = {
    "o_proj": (RandomAdapter(("o_proj",), seed=1, b_std=3.0, alpha=16),
               ("one two three", "two three four", "seven eight nine")),
    "alpha": (RandomAdapter(("q_proj", "k_proj", "v_proj", "o_proj"), seed=0, b_std=0.3, alpha=32),
              ("one two three",)),
    "mlp": (RandomAdapter(("gate_proj", "up_proj", "down_proj"), seed=1, b_std=0.3, alpha=16),
            ("one two three", "two three four", "three four five")),
}
# LoRAs loaded together into one LlmInference. The runtime keeps one set of gate/up/down LoRA
# weights, the last loaded adapter's, for every adapter, so an MLP adapter gets its own instance.
ATTENTION_GROUP = ("trained", "o_proj", "alpha")


def require_web() -> None:
    reason = missing()
    if reason:
        if os.environ.get("REQUIRE_WEB"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def web():
    require_web()
    with WebRuntime() as runtime:
        yield Session(runtime)


class Session:
    """The browser plus what is loaded in it: tests reload only when they need another model."""

    def __init__(self, runtime: WebRuntime):
        self.runtime = runtime
        self.loaded: tuple | None = None
        self.loras: dict[str, str] = {}

    def use(self, model: Path, loras: dict[str, Path]) -> dict[str, str]:
        key = (model, tuple(sorted(loras.items())))
        if key != self.loaded:
            self.loaded = None
            self.runtime.load_model(model, GREEDY, lora_ranks=[8])
            self.loras = {name: self.runtime.load_lora(path) for name, path in loras.items()}
            self.loaded = key
        return self.loras

    def generate(self, prompt: str, lora: str | None = None) -> str:
        # The runtime returns the first piece's leading space ("▁four" -> " four"); the tokenizer's
        # decode drops it.
        return self.runtime.generate(prompt, lora).strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The trained example through `python -m converter.cli` / `bundler.cli`, and each random
    adapter's PEFT folder and converted LoRA .bin."""
    out = tmp_path_factory.mktemp("web")
    base, lora = convert(out / "trained", lora=TRAINED_LORA)
    result = {"bin": base, "task": bundle(base, out / "trained.task"), "trained": lora}
    for name, (spec, _) in ADAPTERS.items():
        result[f"{name}-peft"] = write_adapter(spec, out / f"{name}-peft")
        result[name] = convert(out / name, lora=result[f"{name}-peft"])[1]
    return result


@pytest.fixture(scope="module")
def tokenizer():
    return spm.SentencePieceProcessor(model_file=str(TRAINED_TOKENIZER))


def group(files, name: str) -> dict[str, Path]:
    """The LoRAs to load next to `name` (see ATTENTION_GROUP)."""
    names = ATTENTION_GROUP if name in ATTENTION_GROUP else (name,)
    return {n: files[n] for n in names}


def test_base_bin_generates_the_reference_tokens_and_the_task_answer(web, files):
    web.use(files["bin"], group(files, "trained"))
    reference = load(files["bin"])
    for prompt in task.prompts():
        expected = task.base_answer(prompt, GENERATED)
        assert generate(reference, prompt, GREEDY).text == expected, prompt
        assert web.generate(prompt) == expected, prompt


def test_trained_lora_bin_gives_the_trained_answer(web, files):
    loras = web.use(files["bin"], group(files, "trained"))
    reference = load(files["bin"], files["trained"])
    for prompt in task.prompts():
        assert generate(reference, prompt, GREEDY).text == task.lora_answer(prompt), prompt
        assert web.generate(prompt, loras["trained"]) == task.lora_answer(prompt), prompt
        assert web.generate(prompt) == task.base_answer(prompt, GENERATED), prompt  # the adapter is per call


@pytest.mark.parametrize("name", ADAPTERS)
def test_random_lora_matches_peft(web, files, tokenizer, name):
    """o_proj only (the plain encoding), gate/up/down only, and q/k/v/o with alpha 32 != r 8: the
    runtime's greedy text is PEFT's and our reference runtime's, and differs from the base's."""
    spec, prompts = ADAPTERS[name]
    loras = web.use(files["bin"], group(files, name))
    base, peft = hf_model(), hf_model(files[f"{name}-peft"])
    reference = load(files["bin"], files[name])
    # The "alpha" adapter (alpha 32, r 8) is one whose text shows whether alpha / r was folded in.
    unfolded = hf_model(files[f"{name}-peft"], alpha=spec.rank) if name == "alpha" else None
    for prompt in prompts:
        expected = hf_greedy(peft, tokenizer, prompt)
        assert expected.margin > MIN_MARGIN, f"{name} on {prompt!r}: PEFT's greedy path has a near-tie {expected}"
        assert expected.text != hf_greedy(base, tokenizer, prompt).text, f"{name} on {prompt!r} changes nothing"
        if unfolded is not None:  # storing B without alpha / r would have given another text
            assert expected.text != hf_greedy(unfolded, tokenizer, prompt).text, prompt
        assert generate(reference, prompt, GREEDY).text == expected.text, f"reference runtime, {name}, {prompt!r}"
        assert web.generate(prompt, loras[name]) == expected.text, f"web runtime, {name}, {prompt!r}"


def test_web_runtime_refuses_a_task_wrapping_gpu_weights(web, files, tmp_path):
    """tasks-genai takes a .task for a LiteRT graph model and refuses one that wraps GPU weights,
    ours and MediaPipe 0.10.21's bundler's alike (test_oracle proves them the same bytes but for
    timestamps): on the web, ship the .bin (which generates, above) and LoRA as separate .bin."""
    refusal = r"(?s)Failed to create engine.*interpreter != nullptr.*LiteRTResourceCalculator"
    web.loaded = None
    bundles = [files["task"]]
    oracle = ROOT / ".oracle-venv" / "bin" / "python"
    if oracle.exists():
        theirs = tmp_path / "mediapipe.task"
        subprocess.run([str(oracle), str(ROOT / "scripts" / "oracle_bundle.py"), "--tflite-model", str(files["bin"]),
                        "--tokenizer-model", str(TRAINED_TOKENIZER), "--start-token", "<bos>", "--stop-tokens",
                        "<eos>", "--output-filename", str(theirs)], check=True, capture_output=True, timeout=120)
        bundles.append(theirs)
    for bundle_path in bundles:
        with pytest.raises(WebRuntimeError, match=refusal) as error:
            web.runtime.load_model(bundle_path, GREEDY)
        assert error.match(f"loading {bundle_path.name} failed")


def test_a_hang_is_a_failure_with_a_message(tmp_path, files):
    """For a weights file under 1 MiB the runtime throws outside the promise ("Data size is too
    small") and createFromOptions never settles: the step times out with the page's errors in the
    message, the browser is stopped, and later steps fail at once instead of waiting."""
    require_web()
    small = tmp_path / "small.bin"
    small.write_bytes(files["bin"].read_bytes()[:300_000])
    with WebRuntime(timeouts=Timeouts(load=8)) as runtime:
        with pytest.raises(WebRuntimeError, match=r"(?s)loading small.bin did not finish within 8 s.*too small"):
            runtime.load_model(small, GREEDY)
        with pytest.raises(WebRuntimeError, match="no longer running"):
            runtime.generate("one two three")
