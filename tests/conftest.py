"""Shared fixtures: the checked-in tiny Gemma, its adapter and tokenizer, and a CLI runner."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TINY = FIXTURES / "tiny-gemma"
TINY_LORA = FIXTURES / "tiny-gemma-lora"
TOKENIZER = TINY / "tokenizer.model"


@pytest.fixture(scope="session", autouse=True)
def graph_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`--backend cpu` caches graph templates in $XDG_CACHE_HOME: the session's own, not the user's
    (shared by the session's tests and the CLIs they start, so a template is built once per shape)."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A writable copy of the tiny Gemma checkpoint (config, weights, tokenizer)."""
    return Path(shutil.copytree(TINY, tmp_path / "tiny-gemma"))


@pytest.fixture
def tiny_lora(tmp_path: Path) -> Path:
    """A writable copy of the tiny Gemma's PEFT adapter."""
    return Path(shutil.copytree(TINY_LORA, tmp_path / "tiny-gemma-lora"))


def run_convert(*args: str):
    """Invoke `lora-convert` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from converter.cli import main

    return CliRunner().invoke(main, list(map(str, args)))


def base_args(checkpoint: Path, out: Path, *extra) -> list:
    return ["--model-type", "GEMMA_2B", "--input-ckpt", checkpoint, "--vocab-model-file", TOKENIZER,
            "--output-dir", out, "--output-tflite-file", out / "model.bin", "--quiet", *extra]


def padded_tokenizer(path: Path, pieces: int) -> Path:
    """The tiny tokenizer with user-defined pieces appended up to `pieces` (a vocabulary that fits)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto.FromString(TOKENIZER.read_bytes())
    for index in range(len(proto.pieces), pieces):
        proto.pieces.add(piece=f"<extra_{index}>", score=0.0, type=spm_pb.ModelProto.SentencePiece.USER_DEFINED)
    path.write_bytes(proto.SerializeToString())
    return path
