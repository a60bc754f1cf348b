"""Several adapters on one base: the `Runtime` interface's reference implementation and `lora-run
--lora NAME=PATH ... --adapter NAME`.

The trained example's adapter answers "hello world", a seeded random MLP adapter says something
else, the base counts on (scripts/train_tiny_lora.py): switching between them in one runtime must
give exactly what separate single-adapter runs give, without reading the base again.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter.errors import ConversionError
from converter.tflite import WeightFile
from harness import reference
from harness.cli import main
from harness.generate import Options, generate, load
from harness.runtime import ReferenceRuntime

from .test_hostile_run import parameters_of, refused, rewrite
from .trained import GENERATED, MAX_TOKENS, TRAINED_LORA, RandomAdapter, convert, task, write_adapter

GREEDY = Options(max_tokens=MAX_TOKENS, top_k=1, temperature=0.0)
MLP = RandomAdapter(("gate_proj", "up_proj", "down_proj"), seed=1, b_std=0.3, alpha=16)
PROMPTS = ("one two three", "two three four")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The trained base with its adapter ("hello", int8 base) and a random MLP adapter ("mlp")."""
    out = tmp_path_factory.mktemp("adapters")
    base, hello = convert(out / "trained", lora=TRAINED_LORA)
    mlp = convert(out / "mlp", lora=write_adapter(MLP, out / "mlp-peft"))[1]
    return {"base": base, "hello": hello, "mlp": mlp}


@pytest.fixture(scope="module")
def alone(files) -> dict[tuple[str, str], tuple[list[int], str]]:
    """(adapter, prompt) -> (ids, text) of a separate load per adapter, as `lora-run` did before."""
    runs = {}
    for name in ("base", "hello", "mlp"):
        loaded = load(files["base"], None if name == "base" else files[name])
        for prompt in PROMPTS:
            result = generate(loaded, prompt, GREEDY)
            runs[name, prompt] = (result.ids, result.text)
    return runs


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_adapters_differ_and_do_their_task(alone):
    """Else the switching test below could not tell a mixed-up adapter from the right one."""
    for prompt in PROMPTS:
        assert alone["base", prompt][1] == task.base_answer(prompt, GENERATED)
        assert alone["hello", prompt][1] == task.lora_answer(prompt)
        assert alone["mlp", prompt][1] not in (alone["base", prompt][1], alone["hello", prompt][1])


def test_switching_adapters_in_one_runtime_gives_the_separate_runs_without_reading_the_base_again(
        files, alone, monkeypatch):
    reads = []
    read_rule = reference.read_rule
    monkeypatch.setattr(reference, "read_rule", lambda *args: reads.append(args[2]) or read_rule(*args))
    with ReferenceRuntime(files["base"]) as runtime:
        base_reads = len(reads)
        layers = runtime.loaded.model.layers
        runtime.add_adapter("hello", files["hello"])
        runtime.add_adapter("mlp", files["mlp"])
        assert runtime.adapters == ["hello", "mlp"]
        for name in ("hello", "mlp", "hello", "base", "mlp", None, "hello"):
            for prompt in PROMPTS:
                result = runtime.generate(prompt, GREEDY, name)
                assert (result.ids, result.text) == alone[name or "base", prompt], (name, prompt)
                assert result.tokens_per_second > 0
    assert base_reads > 0 and len(reads) == base_reads  # every base tensor read once, at load
    assert runtime.loaded.model.layers is layers and runtime.loaded.model.adapter is None


def test_a_view_with_an_adapter_shares_every_base_weight(files):
    model = ReferenceRuntime(files["base"]).loaded.model
    view = model.with_adapter(model.read_adapter(WeightFile(files["hello"])))
    assert view.layers is model.layers and view.globals is model.globals and model.adapter is None
    assert view.adapter.path == files["hello"] and any(view.adapter.layers)


def test_runtime_refuses_unknown_and_repeated_names(files):
    runtime = ReferenceRuntime(files["base"])
    runtime.add_adapter("hello", files["hello"])
    with pytest.raises(ConversionError, match=r"^no adapter named 'nope' \(adapters: hello; 'base' for the base model\)$"):
        runtime.generate(PROMPTS[0], GREEDY, "nope")
    with pytest.raises(ConversionError, match=r"^--lora name 'hello' \(of .*\) is given twice; names must be unique$"):
        runtime.add_adapter("hello", files["mlp"])
    assert runtime.adapters == ["hello"]


def test_cli_runs_the_chosen_adapter_of_several(files, alone):
    base, hello, mlp = files["base"], files["hello"], files["mlp"]
    prompt = PROMPTS[0]
    for extra, expected in ((["--adapter", "mlp"], "mlp"), (["--adapter", "hello"], "hello"),
                            (["--adapter", "base"], "base")):
        result = run("--model", base, "--lora", f"hello={hello}", "--lora", f"mlp={mlp}", "--prompt", prompt,
                     "--max-tokens", MAX_TOKENS, "--temperature", 0, *extra)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == alone[expected, prompt][1] and "tokens/s" in result.stderr
    # One --lora, no --adapter: that one, as before; a bare PATH is named after its file (lora.bin: "lora").
    for extra in ([], ["--adapter", "lora"]):
        result = run("--model", base, "--lora", hello, "--prompt", prompt, "--max-tokens", MAX_TOKENS,
                     "--temperature", 0, *extra)
        assert result.exit_code == 0 and result.stdout.strip() == alone["hello", prompt][1], result.output


def test_cli_a_lone_adapter_file_may_have_any_name(files, alone, tmp_path):
    """Its name is never used to choose it, so `7b base.bin` or `base.bin` still run (named "adapter")."""
    for name in ("7b base.bin", "base.bin"):
        renamed = Path(shutil.copy(files["hello"], tmp_path / name))
        result = run("--model", files["base"], "--lora", renamed, "--prompt", PROMPTS[0], "--max-tokens", MAX_TOKENS,
                     "--temperature", 0)
        assert result.exit_code == 0 and result.stdout.strip() == alone["hello", PROMPTS[0]][1], result.output


def test_cli_bad_adapter_names_are_one_line_before_anything_loads(files, monkeypatch):
    base, hello, mlp = files["base"], files["hello"], files["mlp"]
    monkeypatch.setattr(reference, "read_rule", lambda *_: pytest.fail("weights were loaded"))
    cases = [
        (["--lora", f"a={hello}", "--lora", f"b={mlp}"],
         "error: --adapter NAME is required with several --lora: one of a, b, or base for the base model"),
        (["--lora", f"a={hello}", "--adapter", "b"],
         "error: --adapter: no adapter named 'b' (adapters: a; 'base' for the base model)"),
        (["--adapter", "b"], "error: --adapter: no adapter named 'b' (adapters: none; 'base' for the base model)"),
        (["--lora", f"a={hello}", "--lora", f"a={mlp}", "--adapter", "a"],
         f"error: --lora name 'a' (of {mlp}) is given twice; names must be unique"),
        (["--lora", hello, "--lora", hello, "--adapter", "lora"],
         f"error: --lora name 'lora' (of {hello}) is given twice"),
        (["--lora", f"1st={hello}"], f"error: --lora name '1st' (of {hello}): use up to 64 letters, digits and _"),
        (["--lora", f"={hello}"], f"error: --lora name '' (of {hello}): use up to 64 letters"),
        (["--lora", f"a b={hello}"], f"error: --lora name 'a b' (of {hello}): use up to 64 letters"),
        (["--lora", f"base={hello}"], f"error: --lora name 'base' (of {hello}) means the base model without adapter"),
        (["--lora", f"a={base.parent / 'absent.bin'}"], f"error: --lora {base.parent / 'absent.bin'}: file not found"),
    ]
    for args, message in cases:
        refused(run("--model", base, *args, "--prompt", PROMPTS[0]), message)


def test_cli_an_adapter_for_another_base_among_several_is_one_line(files, tmp_path):
    base, hello = files["base"], files["hello"]
    deeper = rewrite(hello, tmp_path / "deeper.bin", parameters_of(hello, num_stacks=3))
    result = run("--model", base, "--lora", f"hello={hello}", "--lora", f"deep={deeper}", "--adapter", "hello",
                 "--prompt", PROMPTS[0], "--max-tokens", MAX_TOKENS)
    refused(result, f"error: --lora {deeper} was converted for another model (num_layers 3 vs 2)")
    assert result.stdout == ""
