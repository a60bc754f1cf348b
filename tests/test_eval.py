"""`lora-run eval`: the trained example's adapter answers "hello world", the base counts on
(scripts/train_tiny_lora.py), so fixtures/eval-hello.jsonl's scores are known without our output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter.errors import ConversionError
from harness.cli import main
from harness.eval_data import Example, Turn, read_examples
from harness.template import PromptTemplate
from harness.metrics import score

from .conftest import FIXTURES
from .trained import MAX_TOKENS, TRAINED_LORA, bundle, convert, run_module

DATA = FIXTURES / "eval-hello.jsonl"
HELLO_LINES = {1, 2, 3, 4}  # the reference is the adapter's answer; lines 5 and 6 the base's counting


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("eval")
    base, lora = convert(out, lora=TRAINED_LORA)
    run_module("converter.cli", "--model-type", "GEMMA_2B", "--input-ckpt", FIXTURES / "trained-gemma",
               "--vocab-model-file", FIXTURES / "trained-gemma" / "tokenizer.model", "--output-dir", out,
               "--output-tflite-file", out / "base-int4.bin", "--quantization", "int4", "--quiet")
    return {"bin": base, "int4": out / "base-int4.bin", "lora": lora, "task": bundle(base, out / "trained.task"),
            "out": out}


def run(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def refused(result, *words: str) -> str:
    """One `error:` line naming the culprit (after `warning:` lines, if any), exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_the_adapter_answers_hello_and_the_base_counts(files):
    result = run(DATA, "--model", files["bin"], "--lora", f"hello={files['lora']}", "--max-tokens", MAX_TOKENS,
                 "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["models"] == ["base.bin"] and document["adapters"] == ["base", "hello"]
    assert document["skipped"] == [] and len(document["examples"]) == 6
    assert {e["format"] for e in document["examples"]} == {"chat", "alpaca"}
    for row in document["results"]:
        assert set(row) == {"line", "model", "adapter", "output", "exact_match", "f1", "rouge_l", "error"}
        assert row["error"] is None
        hello = row["line"] in HELLO_LINES
        expected = 1.0 if hello == (row["adapter"] == "hello") else 0.0
        assert row["exact_match"] == row["f1"] == row["rouge_l"] == expected, row
    means = {a["adapter"]: a for a in document["aggregate"]}
    assert means["hello"]["exact_match"] == pytest.approx(4 / 6) and means["base"]["exact_match"] == pytest.approx(2 / 6)
    assert document["differences"] == []


def test_two_encodings_report_their_difference_and_an_html_chart(files):
    report = files["out"] / "report.html"
    result = run(DATA, "--model", files["task"], "--model", files["int4"], "--lora", files["lora"],
                 "--max-tokens", MAX_TOKENS, "--json", "--report", report)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["models"] == ["trained.task", "base-int4.bin"] and document["adapters"] == ["base", "lora"]
    differences = document["differences"]
    assert [(d["model"], d["reference_model"], d["adapter"]) for d in differences] == \
        [("base-int4.bin", "trained.task", "base"), ("base-int4.bin", "trained.task", "lora")]
    for d in differences:  # each is the mean of the later model minus the first's
        means = {(a["model"], a["adapter"]): a for a in document["aggregate"]}
        later, first = means[(d["model"], d["adapter"])], means[(d["reference_model"], d["adapter"])]
        assert d["f1"] == pytest.approx(later["f1"] - first["f1"])
        assert 0 <= d["changed_outputs"] <= 6
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</svg>" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external assets
    text = run(DATA, "--model", files["task"], "--model", files["int4"], "--lora", files["lora"],
               "--max-tokens", MAX_TOKENS)
    assert text.exit_code == 0 and "Difference from trained.task" in text.stdout and "ROUGE-L" in text.stdout


def test_broken_lines_are_reported_by_number_and_skipped_or_refused(files, tmp_path):
    good = DATA.read_bytes().splitlines()[0]
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"\n".join([good, b"{not json", b'{"messages": "hi"}', b"\xff\xfe", good, b"[1]",
                                 b'{"instruction": "x", "output": 3}', b"[" * 100_000]) + b"\n")
    before = data.read_bytes()
    result = run(data, "--model", files["bin"], "--max-tokens", MAX_TOKENS, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [s["line"] for s in document["skipped"]] == [2, 3, 4, 6, 7, 8]
    assert [e["line"] for e in document["examples"]] == [1, 5]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 6 and f"{data} line 4: not UTF-8" in warnings[2] and "nested too deeply" in warnings[5]
    assert '"output" is a JSON number; expected a string' in warnings[4]
    assert "Traceback" not in result.output and data.read_bytes() == before
    report = tmp_path / "r.html"
    refused(run(data, "--model", files["bin"], "--max-tokens", MAX_TOKENS, "--strict", "--report", report),
            f"{data} line 2: not valid JSON", "--strict")
    assert not report.exists() and list(tmp_path.iterdir()) == [data]


def test_an_example_that_cannot_be_generated_scores_zero_and_the_run_goes_on(files, tmp_path):
    lines = DATA.read_bytes().splitlines()
    too_long = json.dumps({"instruction": "one two three " * 10, "output": "hello world"}).encode()
    data = tmp_path / "long.jsonl"
    data.write_bytes(b"\n".join([lines[0], too_long, lines[4]]) + b"\n")
    result = run(data, "--model", files["bin"], "--lora", f"hello={files['lora']}", "--max-tokens", MAX_TOKENS,
                 "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    failed = [r for r in document["results"] if r["error"] is not None]
    assert [(r["line"], r["adapter"]) for r in failed] == [(2, "base"), (2, "hello")]
    for r in failed:  # the prompt is 31 tokens with the start token: no room in a 16-token KV cache
        assert "the prompt takes 31 tokens" in r["error"] and r["output"] == ""
        assert r["exact_match"] == r["f1"] == r["rouge_l"] == 0.0
    means = {a["adapter"]: a for a in document["aggregate"]}
    assert means["hello"]["failed"] == 1 and means["hello"]["exact_match"] == pytest.approx(1 / 3)
    assert means["base"]["failed"] == 1 and means["base"]["exact_match"] == pytest.approx(1 / 3)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {data} line 2 (base.bin, {name}): {failed[0]['error']}; scored 0"
                        for name in ("base", "hello")]
    table = run(data, "--model", files["bin"], "--max-tokens", MAX_TOKENS)
    assert table.exit_code == 0 and "FAILED: the prompt takes 31 tokens" in table.stdout
    report = tmp_path / "r.html"
    refused(run(data, "--model", files["bin"], "--max-tokens", MAX_TOKENS, "--strict", "--report", report),
            "line 2 (base.bin, base): the prompt takes 31 tokens", "--strict")
    assert not report.exists()
    refused(run(data, "--model", files["bin"], "--max-tokens", 3), "no example could be generated; line 1")


@pytest.mark.parametrize("line, why", [
    (b'{"messages": []}', "non-empty list"),
    (b'{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
    (b'{"messages": [{"role": "assistant", "content": "a"}]}', "no user message"),
    (b'{"messages": [{"role": "robot", "content": "a"}]}', "role 'robot'"),
    (b'{"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]}',
     "message 0's content is a JSON object"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
     "lone surrogate"),
    (b'{"instruction": null, "output": "b"}', '"instruction" is missing or null'),
    (b'{"prompt": "a", "completion": "b"}', "neither chat"),
    (b"1" * 5000, "not valid JSON"),
    (b"null", "a JSON null"),
])
def test_hostile_lines_are_one_line_each(tmp_path, line, why):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(line + b"\n")
    with pytest.raises(ConversionError) as refusal:
        read_examples(data, strict=True)
    assert str(refusal.value).startswith(f"{data} line 1: ") and why in str(refusal.value), refusal.value


def test_bad_command_lines_are_one_line(files, tmp_path):
    refused(run(tmp_path / "none.jsonl", "--model", files["bin"]), "none.jsonl", "file not found")
    refused(run(DATA, "--model", tmp_path / "none.bin"), "--model", "none.bin")
    refused(run(DATA, "--model", files["bin"], "--model", files["bin"]), "given twice")
    refused(run(DATA, "--model", files["bin"], "--lora", tmp_path / "none.bin"), "--lora")
    refused(run(DATA, "--model", files["bin"], "--report", DATA), "--report", "same file as the input DATA")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    refused(run(empty, "--model", files["bin"]), "no examples")
    refused(run(DATA, "--model", files["bin"], "--max-tokens", 4), "line 1", "--max-tokens 4")
    refused(run(DATA, "--model", files["lora"]), "LoRA weights file")


def test_default_command_still_prompts(files):
    result = CliRunner().invoke(main, ["--model", str(files["bin"]), "--prompt", "four five six", "--max-tokens", "8"])
    assert result.exit_code == 0 and result.stdout.startswith("seven eight"), result.output


def test_scores_and_template():
    assert score("The  Hello, world!", "hello world") == score("hello world", "hello world")
    partial = score("hello there world", "hello world")
    assert partial.exact_match == 0 and partial.f1 == pytest.approx(0.8) and partial.rouge_l == pytest.approx(0.8)
    assert score("привет мир", "привет мир").rouge_l == 1.0  # not only a-z0-9 words
    assert score("", "").exact_match == 1.0 and score("", "b").f1 == 0.0
    example = Example(1, "chat", (Turn("system", "be brief"), Turn("user", "hi"), Turn("assistant", "yo"),
                                  Turn("user", "again")), "ok")
    turns = [(turn.role, turn.content) for turn in example.turns]
    assert PromptTemplate("S:", "<u>", "</u>").chat(turns) == "be brief<u>hi</u>yo<u>again</u>"
