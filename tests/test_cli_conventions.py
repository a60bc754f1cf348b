"""CLI conventions: --version, --ckpt-format detection, --model-type inference, Hugging Face hub ids,
and repository hygiene (packaged web page, README paths, no machine paths in scripts)."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from converter.detect import formats_present, infer_model_type, resolve_ckpt_format
from converter.errors import ConversionError
from converter.hub import hub_id

from .conftest import ROOT, TINY, TINY_LORA, TOKENIZER, base_args, run_convert

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def one_error_line(result) -> str:
    """The whole stderr of a failed run: exactly one `error: ...` line, exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --version -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, name", [("converter.cli", "lora-convert"), ("bundler.cli", "lora-bundle"),
                                          ("harness.cli", "lora-run")])
def test_every_tool_prints_its_version(module, name):
    main = __import__(module, fromlist=["main"]).main
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{name} {VERSION}\n"


def test_version_from_a_source_tree_that_is_not_installed(monkeypatch):
    from importlib import metadata

    from converter import version

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert version.package_version() == VERSION


# --ckpt-format --------------------------------------------------------------------------------------

def pytorch_checkpoint(folder: Path) -> Path:
    """The tiny Gemma as one pytorch_model.bin beside its config.json."""
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder)
    torch.save(load_file(str(TINY / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_pytorch_checkpoint_converts_without_ckpt_format(tmp_path):
    reference = tmp_path / "reference"
    assert run_convert(*base_args(TINY, reference, "--ckpt-format", "safetensors")).exit_code == 0
    checkpoint = pytorch_checkpoint(tmp_path / "pt")
    result = run_convert(*base_args(checkpoint, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.bin").read_bytes() == (reference / "model.bin").read_bytes()


@pytest.mark.parametrize("given, other", [("pytorch", "safetensors"), ("safetensors", "pytorch")])
def test_ckpt_format_the_files_contradict_is_one_line(tmp_path, given, other):
    checkpoint = TINY if given == "pytorch" else pytorch_checkpoint(tmp_path / "pt")
    out = tmp_path / "out"
    line = one_error_line(run_convert(*base_args(checkpoint, out, "--ckpt-format", given)))
    assert f"--ckpt-format {given}" in line and str(checkpoint) in line and f"holds {other}" in line
    assert not out.exists()


def test_detection_prefers_safetensors_and_ignores_trainer_and_adapter_files(tmp_path):
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth", "scheduler.pt", "adapter_model.bin"):
        (tmp_path / name).write_bytes(b"x")
    assert formats_present(tmp_path) == []
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert resolve_ckpt_format(tmp_path, None) == "pytorch"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert formats_present(tmp_path) == ["safetensors", "pytorch"]
    assert resolve_ckpt_format(tmp_path, None) == "safetensors"
    assert resolve_ckpt_format(tmp_path, "pytorch") == "pytorch"  # both present: the explicit one stands
    assert resolve_ckpt_format(tmp_path / "model.safetensors.index.json", None) == "safetensors"
    assert resolve_ckpt_format(str(tmp_path / "*.bin"), None) == "pytorch"


# --model-type ---------------------------------------------------------------------------------------

def config_folder(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


GEMMA_7B = dict(model_type="gemma", num_hidden_layers=28, hidden_size=3072, intermediate_size=24576,
                num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000)


@pytest.mark.parametrize("config, expected", [
    (GEMMA_7B, "GEMMA_7B"),
    ({**GEMMA_7B, "vocab_size": 256004}, "GEMMA_7B"),  # a fine-tune that added tokens
    (dict(model_type="gemma3_text", num_hidden_layers=26, hidden_size=1152, intermediate_size=6912,
          num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144), "GEMMA3_1B"),
    (dict(model_type="gemma2", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512), "GEMMA2_2B"),  # one type
])
def test_model_type_is_inferred_from_config(tmp_path, config, expected):
    folder = config_folder(tmp_path, **config)
    assert infer_model_type(folder) == expected
    assert infer_model_type(folder / "model.safetensors") == expected  # a file: its folder's config.json


@pytest.mark.parametrize("config, words", [
    (json.loads((TINY / "config.json").read_text()), ["'gemma'", "GEMMA_2B, GEMMA_7B", "give --model-type"]),
    (dict(model_type="mistral", hidden_size=64), ["'mistral'", "gemma2", "cannot infer --model-type"]),
    (dict(hidden_size=64), ["model_type None", "cannot infer"]),
])
def test_ambiguous_or_unknown_config_is_refused(tmp_path, config, words):
    folder = config_folder(tmp_path, **config)
    with pytest.raises(ConversionError) as error:
        infer_model_type(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message and all(w in message for w in words), message


def test_cli_infers_the_model_type_and_says_so(tmp_path):
    from .test_families import make_tiny

    checkpoint, _ = make_tiny("TINY_GEMMA2", tmp_path / "gemma2")
    out = tmp_path / "out"
    result = run_convert("--input-ckpt", checkpoint, "--vocab-model-file", TOKENIZER, "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert "note: --model-type GEMMA2_2B (inferred from config.json)" in result.stderr
    from converter.tflite import WeightFile

    assert WeightFile(out / "model.tflite").subgraph_name == "GEMMA2_2B"


def test_cli_without_model_type_for_the_ambiguous_tiny_gemma(tmp_path):
    out = tmp_path / "out"
    line = one_error_line(run_convert("--input-ckpt", TINY, "--vocab-model-file", TOKENIZER, "--output-dir", out))
    assert "GEMMA_2B, GEMMA_7B" in line and "--model-type" in line
    assert not out.exists()


def test_model_type_without_any_checkpoint_is_a_usage_error():
    result = run_convert("--check-adapter", TINY_LORA)
    assert result.exit_code == 2 and "--model-type" in result.output and "Traceback" not in result.output


def test_given_model_type_is_kept(tmp_path):
    result = run_convert(*base_args(TINY, tmp_path / "out"))
    assert result.exit_code == 0 and "inferred" not in result.output


# Hugging Face hub ids -------------------------------------------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, source: Path) -> Path:
    """huggingface_hub's cache layout: models--owner--name/snapshots/<sha>/... and refs/main."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / SHA
    shutil.copytree(source, snapshot)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(SHA)
    return snapshot


def run_offline(cache: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], env=env, cwd=cache.parent,
                          capture_output=True, text=True, timeout=300)


def test_hub_ids_are_read_from_the_cache_offline(tmp_path):
    reference = tmp_path / "reference"
    local = ["--lora-ckpt", TINY_LORA, "--lora-rank", 8]
    assert run_convert(*base_args(TINY, reference, *local)).exit_code == 0
    cache = tmp_path / "hub"
    snapshot = cache_repo(cache, "someone/tiny-gemma", TINY)
    cache_repo(cache, "someone/tiny-gemma-lora", TINY_LORA)
    out = tmp_path / "out"
    result = run_offline(cache, "--model-type", "GEMMA_2B", "--input-ckpt", "someone/tiny-gemma",
                         "--vocab-model-file", snapshot / "tokenizer.model", "--output-dir", out,
                         "--lora-ckpt", f"someone/tiny-gemma-lora@{SHA}", "--lora-rank", 8)
    assert result.returncode == 0, result.stderr
    assert f"note: --input-ckpt someone/tiny-gemma is {snapshot}" in result.stderr
    assert (out / "model.tflite").read_bytes() == (reference / "model.bin").read_bytes()
    assert (out / "lora.tflite").read_bytes() == (reference / "lora.tflite").read_bytes()


def test_missing_hub_id_offline_is_one_line(tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    out = tmp_path / "out"
    result = run_offline(cache, "--model-type", "GEMMA_2B", "--input-ckpt", "someone/absent", "--vocab-model-file",
                         TOKENIZER, "--output-dir", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --input-ckpt someone/absent: no such local path")
    assert "HF_HUB_OFFLINE" in lines[0] and str(cache) in lines[0]
    assert not out.exists()


def test_only_missing_paths_with_repo_syntax_are_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("owner/name")["repo"] == "owner/name"
    assert hub_id("owner/name@v1.0")["revision"] == "v1.0"
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_id("owner/name") is None  # a local folder wins
    for value in ("./x/y", "/abs/path", "a/b/c", "ckpt/*.safetensors", "a--b/c", "a/b..c", "name", None):
        assert hub_id(value) is None, value


# packaging and repository hygiene --------------------------------------------------------------------

def test_wheel_package_data_covers_the_web_page():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["harness"]
    files = [p.relative_to(ROOT / "harness").as_posix() for p in (ROOT / "harness" / "web").rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files
    assert any(d.startswith("huggingface_hub") for d in PYPROJECT["project"]["dependencies"])


def test_web_package_lookup(monkeypatch, tmp_path):
    from harness import web_runtime

    monkeypatch.delenv(web_runtime.WEB_DIR_VARIABLE, raising=False)
    assert web_runtime.web_dir() == ROOT / ".web"  # a checkout: its own .web/, wherever we run from
    monkeypatch.setenv(web_runtime.WEB_DIR_VARIABLE, str(tmp_path))
    assert web_runtime.web_dir() == tmp_path
    message = web_runtime.missing(Path(sys.executable), tmp_path / "node_modules")
    assert web_runtime.WEB_DIR_VARIABLE in message


def test_readme_names_only_paths_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    links = re.findall(r"\]\((?!https?:|#)([^)]+)\)", readme)
    named = re.findall(r"`((?:converter|bundler|harness|scripts|tests|fixtures|\.ci)/[\w./-]*)`", readme)
    missing = [p for p in links + named if not (ROOT / p.split("#")[0]).exists()]
    assert named and not missing, missing


def test_scripts_and_tests_have_no_machine_paths():
    machine = re.compile(r"[\"'](/work|/root|/home|/tmp)/")
    files = [p for p in (*(ROOT / "scripts").iterdir(), *(ROOT / "tests").glob("*.py")) if p.is_file()]
    offenders = [f"{p.name}:{n}" for p in files if p.name != Path(__file__).name
                 for n, line in enumerate(p.read_text().splitlines(), 1) if machine.search(line)]
    assert not offenders, offenders
