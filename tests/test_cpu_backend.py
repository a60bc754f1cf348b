"""`--backend cpu`: LiteRT-LM's CPU executor (XNNPACK) runs what lora-convert and lora-bundle write,
and generates transformers' greedy text (PEFT's with the adapter) on tiny random models of every
family the CPU graph expresses; the trained example answers "hello world" with its adapter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from .conftest import TINY, TINY_LORA, TOKENIZER, run_convert
from .trained import MAX_TOKENS as TRAINED_TOKENS
from .trained import TRAINED, TRAINED_LORA, TRAINED_TOKENIZER, run_module, task

pytest.importorskip("litert_torch")

KV_CACHE, PREFILL, MAX_TOKENS = 64, 16, 24
BOS, EOS = 2, 1  # the tiny tokenizer's <bos> and <eos>
PROMPTS = ["one two three", "hello"]
# Tiny random models (GQA where the family has it); settings that the CPU graph must follow bite:
# Gemma 2's soft caps, Gemma 3's 4-token window before one global layer, Phi-2's partial rotary.
CONFIGS = {
    "GEMMA_2B": dict(model_type="gemma", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "GEMMA2_2B": dict(model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      query_pre_attn_scalar=16, attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
    "GEMMA3_1B": dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      query_pre_attn_scalar=16, sliding_window=4,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "PHI_2": dict(model_type="phi", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, partial_rotary_factor=0.4, bos_token_id=BOS, eos_token_id=EOS),
}
LORA_TARGETS = {"PHI_2": ["q_proj", "k_proj", "v_proj", "dense"]}
MERGED = ("GEMMA3_1B",)  # converted with --merge-lora (the others with a LoRA file)


def hf_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(CONFIGS[model_type])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(sorted(CONFIGS).index(model_type))
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their init, so a misplaced one shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def peft_model(model, rank: int = 4, alpha: int = 8, seed: int = 7):
    """A random rank-4 q/k/v/o adapter with alpha = 2r (so an ignored alpha shows)."""
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS.get(model.config.model_type.upper(), ["q_proj", "k_proj", "v_proj", "o_proj"])
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    peft = get_peft_model(model, config).eval()
    with torch.no_grad():  # B large enough to move greedy tokens
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return peft


def hf_greedy(model, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    """Greedy text as LiteRT-LM decodes: <bos> + prompt, until <eos> or the KV cache is full; shown as
    LiteRT-LM streams it, without NUL bytes (its pieces are C strings: random tiny models do
    generate the `<0x00>` byte piece, which then streams as nothing)."""
    tokenizer = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    ids = [BOS] + tokenizer.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        while len(ids) + len(out) < max_tokens:
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == EOS:
                break
            out.append(token)
    return tokenizer.decode(out).replace("\x00", "")


def cpu_convert(checkpoint: Path, model_type: str, out: Path, tokenizer: Path = TOKENIZER, *extra) -> Path:
    """`python -m converter.cli --backend cpu` then `python -m bundler.cli --format litertlm`: the .litertlm."""
    run_module("converter.cli", "--backend", "cpu", "--model-type", model_type, "--input-ckpt", checkpoint,
               "--vocab-model-file", tokenizer, "--output-dir", out, "--output-tflite-file", out / "model.tflite",
               "--kv-cache-size", KV_CACHE, "--prefill-length", PREFILL, "--quiet", *extra, timeout=600)
    run_module("bundler.cli", "--tflite-model", out / "model.tflite", "--tokenizer-model", tokenizer,
               "--start-token", "<bos>", "--stop-tokens", "<eos>", "--output-filename", out / "model.litertlm",
               "--format", "litertlm")
    return out / "model.litertlm"


def run_cpu(bundle: Path, prompts: list[str], max_tokens: int, lora: Path | None = None) -> dict:
    from .test_bundler import run_litertlm

    return run_litertlm(bundle, prompts, max_tokens, lora, cpu=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    """(model type, base model, PEFT model, LiteRT-LM's texts, output folder): one fp32 CPU export per
    family, with the adapter as a LoRA file (merged into Gemma 3's, to cover --merge-lora)."""
    model_type = request.param
    folder = tmp_path_factory.mktemp(model_type.lower())
    model = hf_model(model_type)
    model.save_pretrained(str(folder / "ckpt"))
    peft = peft_model(hf_model(model_type))
    peft.save_pretrained(str(folder / "adapter"))
    merged = model_type in MERGED
    extra = ["--merge-lora"] if merged else ["--lora-output-tflite-file", folder / "out" / "lora.bin"]
    bundle = cpu_convert(folder / "ckpt", model_type, folder / "out", TOKENIZER, "--quantization", "fp32",
                         "--lora-ckpt", folder / "adapter", *extra)
    texts = run_cpu(bundle, PROMPTS, MAX_TOKENS, None if merged else folder / "out" / "lora.bin")
    return model_type, model, peft, texts, folder / "out"


def test_litertlm_cpu_generates_transformers_and_peft_text(family):
    model_type, model, peft, texts, _ = family
    expected = [hf_greedy(peft, prompt) for prompt in PROMPTS]
    adapted = texts["base"] if model_type in MERGED else texts["lora"]
    assert adapted == expected
    if model_type not in MERGED:
        assert texts["base"] == [hf_greedy(model, prompt) for prompt in PROMPTS]
    with peft.disable_adapter():
        assert expected != [hf_greedy(peft, prompt) for prompt in PROMPTS]  # the adapter changes the output


def test_alpha_is_honoured(family):
    """PEFT's alpha / r (2 here) is folded in: the same adapter at alpha = r generates other text."""
    model_type, _, _, texts, _ = family
    unscaled = peft_model(hf_model(model_type), alpha=4)
    adapted = texts["base"] if model_type in MERGED else texts["lora"]
    assert adapted != [hf_greedy(unscaled, prompt) for prompt in PROMPTS]


def test_package_lays_out_the_cpu_model_with_its_lora_file(family, tmp_path):
    """`lora-bundle package` takes the .litertlm of a CPU graph and LoRA files made for it, and
    refuses a LoRA file made for the GPU (other tensors)."""
    model_type, _, _, _, out = family
    if model_type in MERGED:
        pytest.skip("merged: no LoRA file")
    run_module("bundler.cli", "package", out / "model.litertlm", "--lora", f"tuned={out / 'lora.bin'}",
               "--platform", "ios", "--output", tmp_path / "ios")
    manifest = json.loads((tmp_path / "ios" / "llm" / "manifest.json").read_text())
    assert manifest["model"]["format"] == "litertlm" and manifest["model"]["vocab_size"] == 512
    assert manifest["model"]["model_type"] == "tf_lite_prefill_decode"
    assert [(a["name"], a["lora_rank"], a["targets"]) for a in manifest["adapters"]] == [
        ("tuned", 16, ["k", "o", "q", "v"])]
    assert (tmp_path / "ios" / "llm" / "lora.bin").read_bytes() == (out / "lora.bin").read_bytes()
    gpu = run_convert("--model-type", "GEMMA_2B", "--input-ckpt", TINY, "--vocab-model-file", TOKENIZER,
                      "--output-dir", tmp_path / "gpu", "--lora-ckpt", TINY_LORA, "--quiet")
    assert gpu.exit_code == 0, gpu.output
    from bundler.cli import main as bundle_main
    from click.testing import CliRunner

    result = CliRunner().invoke(bundle_main, ["package", str(out / "model.litertlm"), "--lora",
                                              str(tmp_path / "gpu" / "lora.tflite"), "--platform", "android",
                                              "--output", str(tmp_path / "android")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --lora ") and "rank 8; the CPU graph" in result.stderr
    assert not (tmp_path / "android").exists()


def test_trained_example_says_hello_world_on_the_cpu(tmp_path):
    """int8 (the default) with the trained rank-8 adapter padded to rank 16: the task's answers."""
    out = tmp_path / "trained"
    bundle = cpu_convert(TRAINED, "GEMMA_2B", out, TRAINED_TOKENIZER, "--lora-ckpt", TRAINED_LORA,
                         "--lora-output-tflite-file", out / "lora.bin")
    prompts = task.prompts()[::3]
    texts = run_cpu(bundle, prompts, TRAINED_TOKENS, out / "lora.bin")
    generated = TRAINED_TOKENS - 1 - task.PROMPT_WORDS
    assert texts["base"] == [task.base_answer(prompt, generated) for prompt in prompts]
    assert texts["lora"] == [task.lora_answer(prompt) for prompt in prompts]
    # `lora-run --runtime litertlm --backend cpu`: the adapter, then the base on the same runtime (LiteRT-LM's
    # CPU executor would keep the LoRA for a session naming none), then the adapter again.
    process = subprocess.run([sys.executable, "-m", "harness.cli", "--runtime", "litertlm", "--backend", "cpu",
                              "--model", bundle, "--lora", f"hello={out / 'lora.bin'}", "--prompt", prompts[0],
                              "--max-tokens", str(TRAINED_TOKENS), "--temperature", "0"],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip() == texts["lora"][0].strip()
    from harness.generate import Options
    from harness.litertlm_runtime import LiteRTLMRuntime

    greedy = Options(TRAINED_TOKENS, top_k=1, temperature=0.0)
    with LiteRTLMRuntime(bundle, greedy, "cpu") as runtime:
        runtime.add_adapter("hello", out / "lora.bin")
        switched = [runtime.generate(prompts[0], greedy, name).text for name in ("hello", "base", "hello")]
    assert switched == [texts["lora"][0], texts["base"][0], texts["lora"][0]]


REFUSALS = [
    # (options replacing or added to the common ones, None for a flag; what the one line must say)
    ({"--model-type": "FALCON_RW_1B"}, "--backend cpu is not supported for FALCON_RW_1B"),
    ({"--lora-ckpt": str(TINY_LORA), "--lora-rank": "8"},
     "--lora-rank 8: --backend cpu takes LoRA ranks 16 or 32"),
    ({"--mediapipe-compat": None}, "does not apply to --backend cpu"),
    ({"--kv-cache-size": "16", "--prefill-length": "32"}, "--prefill-length 32 is above --kv-cache-size 16"),
    # the GPU path's refusals hold: an adapter given as the base, another family's checkpoint
    ({"--input-ckpt": str(TINY_LORA)}, "--lora-ckpt"),
    ({"--model-type": "GEMMA2_2B"}, "model_type 'gemma' does not match --model-type GEMMA2_2B"),
]


def refused(*args) -> str:
    """The one `error:` line of a refused conversion."""
    result = run_convert(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("options, message", REFUSALS)
def test_cpu_refusals_are_one_line_and_write_nothing(tmp_path, options, message):
    out = tmp_path / "out"
    common = {"--backend": "cpu", "--model-type": "GEMMA_2B", "--input-ckpt": str(TINY),
              "--vocab-model-file": str(TOKENIZER), "--output-dir": str(out), "--quiet": None}
    args = [item for option, value in {**common, **options}.items() for item in (option, value) if item is not None]
    assert message in refused(*args)
    assert not out.exists()


def test_mlp_lora_is_refused_on_the_cpu_with_a_pointer_to_merging(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = hf_model("GEMMA_2B")
    model.save_pretrained(str(tmp_path / "ckpt"))
    peft = get_peft_model(hf_model("GEMMA_2B"), LoraConfig(r=4, target_modules=["q_proj", "gate_proj"]))
    peft.save_pretrained(str(tmp_path / "adapter"))
    line = refused("--backend", "cpu", "--model-type", "GEMMA_2B", "--input-ckpt", tmp_path / "ckpt",
                   "--vocab-model-file", TOKENIZER, "--output-dir", tmp_path / "out", "--lora-ckpt",
                   tmp_path / "adapter", "--quiet")
    assert line == ("error: --backend cpu takes LoRA on self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, "
                    "self_attn.o_proj only; the adapter also adapts mlp.gate_proj: merge it with --merge-lora "
                    "--merge-unsupported")
    assert not (tmp_path / "out").exists()
