"""README's "Check your fine-tune before shipping" walk-through, run as written so it cannot rot:
its `sh` blocks in order, as one bash script in a fresh folder holding the fixtures, with the
installed `lora-convert`, `lora-bundle` and `lora-run`. Only the server's port is changed (to a free
one). What they print is checked against the trained example's task (scripts/train_tiny_lora.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FIXTURES, ROOT
from .trained import task

HEADING = "### Check your fine-tune before shipping"
PROMPT = "four five six"


def walkthrough_blocks(readme: str) -> list[str]:
    """The `sh` code blocks of the walk-through section (up to the next heading)."""
    section = readme[readme.index(HEADING) + len(HEADING):]
    section = re.split(r"^#{1,3} ", section, flags=re.MULTILINE)[0]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    if shutil.which("curl") is None:
        pytest.skip("the walk-through's serve step needs curl")
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    script = "\n".join(blocks)
    for tool in ("lora-convert ", "lora-bundle ", "lora-run --model", "lora-run eval ", "lora-run serve ", "curl "):
        assert tool in script, f"the walk-through lost its {tool.strip()} step"
    assert script.count("--port 8080") == 1 and script.count("localhost:8080/") == 2
    port = free_port()
    script = script.replace("--port 8080", f"--port {port}").replace("localhost:8080/", f"localhost:{port}/")
    folder = tmp_path_factory.mktemp("walk")
    (folder / "fixtures").symlink_to(FIXTURES)
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "PYTHONPATH": str(ROOT)}
    process = subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}\nwait\n"], cwd=folder, env=environment,
                             capture_output=True, text=True, timeout=600)
    return process, folder


def test_every_command_of_the_walkthrough_works_as_written(walked):
    process, folder = walked
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Traceback" not in process.stderr and "error:" not in process.stderr
    lines = process.stdout.splitlines()
    counting = task.base_answer(PROMPT, 16 - 1 - task.PROMPT_WORDS)  # the KV cache: <bos> + 3 words + 12
    assert lines[:2] == [task.lora_answer(PROMPT), counting], lines[:2]
    assert {"trained.bin", "trained-int4.bin", "hello.bin", "hello-raw.bin", "trained.task", "eval.html"} \
        <= {p.name for p in (folder / "out").iterdir()}
    assert "Difference from trained.task" in process.stdout
    served = process.stdout[process.stdout.index('{"generated_text"'):]  # curl adds no newline
    answers = []
    while served.strip():
        answer, end = json.JSONDecoder().raw_decode(served)
        answers.append(answer)
        served = served[end:].lstrip()
    assert answers[0] == {"generated_text": task.lora_answer(PROMPT)}
    assert answers[1]["model"] == "base" and answers[1]["choices"][0]["message"]["content"] == counting
    assert process.stderr.rstrip().endswith("stopped")  # `kill %1` ended the server cleanly


def test_the_eval_table_says_what_the_readme_says(walked):
    process, _ = walked
    table = process.stdout[process.stdout.index("Mean over examples"):]
    rows = {tuple(line.split()[:2]): line.split()[4:] for line in table.splitlines()[2:8]}
    for model in ("trained.task", "trained-int4.bin"):
        # four hello references out of six: the adapters match those, the base the two counting ones
        assert rows[model, "base"] == ["0.333"] * 3 and rows[model, "hello"] == rows[model, "raw"] == ["0.667"] * 3
    assert "0/6" in table
