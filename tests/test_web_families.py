"""The real MediaPipe web runtime (@mediapipe/tasks-genai in headless Chromium, WebGPU on
SwiftShader) on each model family besides GEMMA_2B (tests/test_web_runtime.py): a tiny random
transformers model per family, converted to int8 with `lora-convert`, loaded by the runtime and
run greedily (topK 1); its text must be the reference runtime's greedy text.

The tiny models are made confident: their final norm is scaled so the logits grow LOGIT_SCALE
times, and the reference runtime's top-1 minus top-2 logit margin on every compared step is
asserted above MIN_MARGIN, so an fp16 near-tie in the runtime cannot pass for a bug or hide one.
Several prompts with different reference texts are compared, so a model that repeats one token
whatever the prompt cannot pass.

What the runtime does wrong (tasks-genai 0.10.29) is asserted as observed, so a fixed runtime
makes these tests fail and get updated: see the README's web-runtime section.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converter.runtime_options import RuntimeOptions
from harness.generate import LoadedModel, load, prompt_ids
from harness.web_runtime import WebRuntime, WebRuntimeError

from .conftest import TOKENIZER, run_convert
from .test_families import hf_config as gemma_config
from .test_families import PRESETS as GEMMA_PRESETS
from .test_families_other import TINY_CONFIGS
from .test_web_runtime import require_web

pytestmark = pytest.mark.web

MAX_TOKENS = 16  # KV cache: start token + prompt + generated
GREEDY = RuntimeOptions(max_tokens=MAX_TOKENS, top_k=1, temperature=0.0, random_seed=0)
LOGIT_SCALE = 64.0
MIN_MARGIN = 0.15
PROMPTS = ("one two three", "hello world", "seven eight")
# Falcon-RW's tiny model continues most prompts with one byte token; these two differ.
FALCON_PROMPTS = ("seven eight", "paper lemon")

# model type -> (transformers config, the final norm's name, whether its scale is stored as 1 + w).
FAMILIES = {
    "GEMMA2_2B": ({**GEMMA_PRESETS["TINY_GEMMA2"], "final_logit_softcapping": 30.0}, "model.norm", True),
    "GEMMA3_1B": (GEMMA_PRESETS["TINY_GEMMA3"], "model.norm", True),
    "PHI_2": (TINY_CONFIGS["PHI_2"], "model.final_layernorm", False),
    "FALCON_RW_1B": (TINY_CONFIGS["FALCON_RW_1B"], "transformer.ln_f", False),
    "STABLELM_4E1T_3B": (TINY_CONFIGS["STABLELM_4E1T_3B"], "model.norm", False),
}


def tiny_model(model_type: str):
    """A seeded random transformers model of the family, norms and biases off their 1/0 init,
    its final norm scaled so the logits are LOGIT_SCALE times larger (confident greedy steps)."""
    from transformers import AutoModelForCausalLM

    values, final_norm, one_plus = FAMILIES[model_type]
    config = gemma_config(values)
    torch.manual_seed(sorted(FAMILIES).index(model_type))
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        parameters = dict(model.named_parameters())
        scale = parameters[f"{final_norm}.weight"]
        scale.copy_((scale + 1) * LOGIT_SCALE - 1 if one_plus else scale * LOGIT_SCALE)
        if f"{final_norm}.bias" in parameters:
            parameters[f"{final_norm}.bias"].mul_(LOGIT_SCALE)
    return model


def convert(model_type: str, folder: Path, *extra) -> Path:
    """save_pretrained, then `lora-convert` to int8 (the default); returns the base .bin."""
    tiny_model(model_type).save_pretrained(str(folder / "ckpt"))
    result = run_convert("--model-type", model_type, "--input-ckpt", folder / "ckpt", "--vocab-model-file", TOKENIZER,
                         "--output-dir", folder, "--output-tflite-file", folder / "model.bin", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return folder / "model.bin"


def reference_greedy(loaded: LoadedModel, prompt: str) -> tuple[str, float]:
    """The reference runtime's greedy text and its smallest top-1 minus top-2 logit margin."""
    ids = prompt_ids(loaded, prompt)
    out, margins = [], []
    with torch.no_grad():
        while len(ids) < MAX_TOKENS:
            top = loaded.model.forward(ids)[0][-1].topk(2)
            margins.append(float(top.values[0] - top.values[1]))
            token = int(top.indices[0])
            if token in loaded.stop_ids:
                break
            out.append(token)
            ids.append(token)
    return loaded.tokenizer.decode(out), min(margins)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("web-families")
    return {model_type: convert(model_type, out / model_type.lower()) for model_type in FAMILIES}


@pytest.fixture(scope="module")
def web():
    require_web()
    with WebRuntime() as runtime:
        yield runtime


def expected_texts(model: Path, prompts: tuple[str, ...] = PROMPTS) -> dict[str, str]:
    """Reference greedy text per prompt, with clear margins, different across prompts."""
    loaded = load(model)
    texts = {}
    for prompt in prompts:
        text, margin = reference_greedy(loaded, prompt)
        assert margin > MIN_MARGIN, f"{model.parent.name} on {prompt!r}: near-tie in the reference ({margin:.3f})"
        texts[prompt] = text
    assert len(set(texts.values())) == len(prompts), texts
    return texts


@pytest.mark.parametrize("model_type", ["GEMMA2_2B", "GEMMA3_1B"])
def test_runtime_generates_the_reference_text(web, files, model_type):
    """One fresh LlmInference per prompt (see the next test for why). The runtime prefixes a
    space to the text, so both sides are compared stripped."""
    for prompt, text in expected_texts(files[model_type]).items():
        web.load_model(files[model_type], GREEDY)
        assert web.generate(prompt).strip() == text.strip(), f"{model_type} on {prompt!r}"


@pytest.mark.parametrize("model_type", ["GEMMA2_2B", "GEMMA3_1B"])
def test_gemma2_and_gemma3_answer_a_repeated_prompt_differently(web, files, model_type):
    """Observed runtime defect: with Gemma 2 and Gemma 3 (not Gemma or Falcon-RW), a second
    generateResponse in the same LlmInference computes from state the first one left; the same
    prompt, asked again, gives another text (reloading the model gives the right one again)."""
    prompt = PROMPTS[0]
    expected = expected_texts(files[model_type])[prompt]
    web.load_model(files[model_type], GREEDY)
    assert web.generate(prompt).strip() == expected.strip()
    assert web.generate(prompt).strip() != expected.strip()


def test_falcon_rw_text_is_not_the_reference_text(web, files):
    """Observed, not yet explained: on "seven eight" (reference margin > MIN_MARGIN) the runtime
    continues with another token than the reference runtime (and transformers); on "paper lemon"
    (margin > 9) it gives the reference's tokens but stops several tokens before the KV cache is
    full. LiteRT-LM's GPU executor on the same file also gives the other token on "seven eight"
    but the full length: see the README."""
    expected = expected_texts(files["FALCON_RW_1B"], FALCON_PROMPTS)
    web.load_model(files["FALCON_RW_1B"], GREEDY)
    different, short = (web.generate(prompt).strip() for prompt in FALCON_PROMPTS)
    assert different[0] != expected["seven eight"][0]
    assert short and expected["paper lemon"].startswith(short) and len(short) < len(expected["paper lemon"])


@pytest.mark.parametrize("model_type", ["PHI_2", "STABLELM_4E1T_3B"])
def test_phi2_and_stablelm_shaders_do_not_compile(web, files, model_type):
    """Observed runtime defect: the model loads, but the runtime generates WGSL that does not
    compile (`vec4<f32> + vec4<bool>`) and generation fails with GPUValidationErrors, as in
    LiteRT-LM's GPU executor on the same SwiftShader."""
    web.load_model(files[model_type], GREEDY)
    seen = len(web.console)
    with pytest.raises(WebRuntimeError, match="generating failed: .*GPUValidationError"):
        web.generate(PROMPTS[0])
    assert any("no matching overload for 'operator + (vec4<f32>, vec4<bool>)'" in line for line in web.console[seen:])
