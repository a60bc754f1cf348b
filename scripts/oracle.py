"""Shared helpers for the scripts that compare with MediaPipe 0.10.21: the oracle venv,
real-shape checkpoints, and running a command while measuring wall time and peak RSS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent


def oracle_python() -> str:
    """Path of the oracle venv's python (created on first use by setup_oracle.sh)."""
    result = subprocess.run(["bash", str(SCRIPTS / "setup_oracle.sh")], check=True, capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1]


def ensure_checkpoint(preset: str, folder: Path, lora_rank: int | None = None) -> tuple[Path, Path | None, Path]:
    """A deterministic random-weight checkpoint (+ adapter, + tokenizer with as many pieces as the
    vocabulary), generated if missing."""
    adapter = Path(f"{folder}-lora") if lora_rank else None
    tokenizer = folder / "tokenizer.model"
    if not (folder / "config.json").is_file() or (adapter and not (adapter / "adapter_config.json").is_file()):
        command = [sys.executable, str(SCRIPTS / "make_checkpoint.py"), "--preset", preset, "--out", str(folder)]
        if lora_rank:
            command += ["--lora-rank", str(lora_rank)]
        subprocess.run(command, check=True)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    if not tokenizer.is_file() or sentencepiece_size(tokenizer) != vocab_size:
        subprocess.run([sys.executable, str(SCRIPTS / "make_tokenizer.py"), "--out", str(tokenizer),
                        "--pad-to", str(vocab_size)], check=True)
    return folder, adapter, tokenizer


def sentencepiece_size(path: Path) -> int:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    return len(spm_pb.ModelProto.FromString(path.read_bytes()).pieces)


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss_bytes: int
    returncode: int


def run_measured(command: list[str], cwd: Path | None = None, quiet: bool = True) -> Measured:
    """Run a command; wall time and the child's own peak RSS (from wait4)."""
    start = time.perf_counter()
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=output)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    return Measured(seconds, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
