"""Files on the unhappy path, in all three tools: outputs that are inputs, inputs that are not
regular files, output paths that cannot be made, disk full, signals and SIGBUS mid-run."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bundler.cli import main as bundle_main
from converter import files
from converter.config import ConversionConfig
from converter.convert import execute
from converter.plan import make_plan
from harness.cli import main as run_main

from .conftest import ROOT, TINY, TINY_LORA, TOKENIZER, base_args, run_convert

GEMMA_TOKENS = ["--start-token", "<bos>", "--stop-tokens", "<eos>"]
LORA = ["--lora-ckpt", TINY_LORA, "--lora-rank", 8]


def run_bundle(*args):
    return CliRunner().invoke(bundle_main, list(map(str, args)))


def run_run(*args):
    return CliRunner().invoke(run_main, list(map(str, args)))


def one_error_line(result, *words: str, code: int = 1) -> str:
    """The run failed with `code` and exactly one `error:` line on stderr holding every word."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256 (the inputs' bytes must never change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Gemma converted (a correct input works): (base .bin, LoRA .bin)."""
    out = tmp_path_factory.mktemp("converted")
    result = run_convert(*base_args(TINY, out, *LORA, "--lora-output-tflite-file", out / "adapter.bin"))
    assert result.exit_code == 0, result.output
    return out / "model.bin", out / "adapter.bin"


@pytest.fixture
def alarm():
    """Fail instead of hanging (a FIFO opened for reading blocks forever)."""
    def expired(*_):
        raise TimeoutError("hung on a non-regular input")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def sharded(tmp_path: Path) -> Path:
    """The tiny checkpoint in two shards with a model.safetensors.index.json."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    tensors = load_file(str(TINY / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(TINY / "config.json", folder)
    return folder


# 1. An output that is an input (the same path, a link to it, or the other output) is refused.

OVERWRITES = {
    "base over weights": ("--output-tflite-file", lambda c, a, t: c / "model.safetensors", "--input-ckpt"),
    "base over tokenizer": ("--output-tflite-file", lambda c, a, t: c / "tokenizer.model", "--vocab-model-file"),
    "base over config.json": ("--output-tflite-file", lambda c, a, t: c / "config.json", "--input-ckpt"),
    "lora over adapter weights": ("--lora-output-tflite-file", lambda c, a, t: a / "adapter_model.safetensors",
                                  "--lora-ckpt"),
    "lora over adapter config": ("--lora-output-tflite-file", lambda c, a, t: a / "adapter_config.json", "--lora-ckpt"),
    "base over a hard link of the weights": ("--output-tflite-file", lambda c, a, t: link(c / "model.safetensors",
                                             t / "hard.bin", os.link), "--input-ckpt"),
    "base over a symlink to the tokenizer": ("--output-tflite-file", lambda c, a, t: link(c / "tokenizer.model",
                                             t / "soft.bin", os.symlink), "--vocab-model-file"),
    "lora over the base output": ("--lora-output-tflite-file", lambda c, a, t: t / "out" / "model.bin",
                                  "--output-tflite-file"),
}


def link(target: Path, name: Path, how) -> Path:
    how(target, name)
    return name


@pytest.mark.parametrize("case", OVERWRITES)
def test_convert_never_overwrites_an_input(case, tiny, tiny_lora, tmp_path):
    option, target, culprit = OVERWRITES[case]
    path = target(tiny, tiny_lora, tmp_path)
    before = digests(tmp_path)
    args = base_args(tiny, tmp_path / "out", "--vocab-model-file", tiny / "tokenizer.model", "--lora-ckpt", tiny_lora,
                     "--lora-rank", 8)
    if option == "--output-tflite-file":
        args += ["--output-tflite-file", path]
    else:
        args += ["--lora-output-tflite-file", path]
    one_error_line(run_convert(*args), option, culprit, "same file")
    assert digests(tmp_path) == before
    assert not partials(tmp_path)


def test_convert_never_overwrites_a_shard_named_by_the_index(tmp_path):
    folder = sharded(tmp_path)
    before = digests(tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    result = run_convert(*base_args(folder / "model.safetensors.index.json", tmp_path / "out"),
                         "--output-tflite-file", shard)
    one_error_line(result, "--output-tflite-file", "--input-ckpt", shard.name)
    assert digests(tmp_path) == before
    works = run_convert(*base_args(folder, tmp_path / "out"))  # the same shards convert
    assert works.exit_code == 0, works.output


def test_bundle_never_overwrites_its_model_or_tokenizer(converted, tmp_path):
    model = Path(shutil.copy(converted[0], tmp_path / "model.bin"))
    os.link(model, tmp_path / "linked.task")
    tokenizer = Path(shutil.copy(TOKENIZER, tmp_path / "tok.litertlm"))
    before = digests(tmp_path)
    result = run_bundle("--tflite-model", model, "--tokenizer-model", TOKENIZER, *GEMMA_TOKENS,
                        "--output-filename", tmp_path / "linked.task")
    one_error_line(result, "--output-filename", "--tflite-model", "same file")
    result = run_bundle("--tflite-model", model, "--tokenizer-model", tokenizer, *GEMMA_TOKENS, "--format", "litertlm",
                        "--output-filename", tokenizer)
    one_error_line(result, "--output-filename", "--tokenizer-model")
    assert digests(tmp_path) == before and not partials(tmp_path)
    works = run_bundle("--tflite-model", model, "--tokenizer-model", TOKENIZER, *GEMMA_TOKENS,
                       "--output-filename", tmp_path / "ok")
    assert works.exit_code == 0 and (tmp_path / "ok.task").is_file(), works.output


def test_package_never_overwrites_its_inputs(converted, tmp_path):
    folder = tmp_path / "dist" / "llm"
    folder.mkdir(parents=True)
    model = Path(shutil.copy(converted[0], folder / "model.bin"))
    before = digests(tmp_path)
    result = run_bundle("package", model, "--lora", converted[1], "--platform", "ios", "--output", tmp_path / "dist")
    one_error_line(result, "--output", "MODEL", "holds the input")
    assert digests(tmp_path) == before and sorted(p.name for p in folder.iterdir()) == ["model.bin"]


# 2. Inputs must be regular files (or folders where documented): refused at once, never opened.

@pytest.fixture
def specials(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    yield {"FIFO": fifo, "character device": Path("/dev/zero"), "socket": tmp_path / "sock"}
    server.close()


CONVERT_INPUTS = [("--input-ckpt", "FIFO"), ("--vocab-model-file", "character device"), ("--lora-ckpt", "FIFO"),
                  ("--vocab-model-file", "socket")]


@pytest.mark.parametrize("option,kind", CONVERT_INPUTS)
def test_convert_refuses_inputs_that_are_not_files(option, kind, specials, tmp_path, alarm):
    args = base_args(TINY, tmp_path / "out", *LORA) + [option, specials[kind]]
    one_error_line(run_convert(*args), option, specials[kind], kind, "expected a regular file")
    assert not (tmp_path / "out").exists()


def test_check_adapter_refuses_a_fifo(specials, alarm):
    result = run_convert("--model-type", "GEMMA_2B", "--check-adapter", specials["FIFO"])
    one_error_line(result, "--check-adapter", "FIFO")


@pytest.mark.parametrize("size,words", [(files.MAX_JSON_BYTES + 1, ["larger than 64 MiB"]),
                                        (None, ["nested too deeply"])])
def test_json_is_bounded_in_size_and_depth(size, words, tiny, tmp_path, alarm):
    config = tiny / "config.json"
    if size:
        os.truncate(config, size)  # sparse: 64 MiB of nothing costs no disk
    else:
        config.write_text("[" * 200_000 + "]" * 200_000)
    one_error_line(run_convert(*base_args(tiny, tmp_path / "out")), "config.json", *words)


def test_bundle_tools_refuse_inputs_that_are_not_files(converted, specials, tmp_path, alarm):
    fifo, zero = specials["FIFO"], specials["character device"]
    one_error_line(run_bundle("--tflite-model", fifo, "--tokenizer-model", TOKENIZER, *GEMMA_TOKENS,
                              "--output-filename", tmp_path / "b"), "--tflite-model", "FIFO")
    one_error_line(run_bundle("--tflite-model", converted[0], "--tokenizer-model", zero, *GEMMA_TOKENS,
                              "--output-filename", tmp_path / "b"), "--tokenizer-model", "character device")
    one_error_line(run_bundle("inspect", fifo), str(fifo), "FIFO")
    one_error_line(run_bundle("package", fifo, "--platform", "ios", "--output", tmp_path / "p"), "MODEL", "FIFO")
    one_error_line(run_bundle("package", converted[0], "--lora", zero, "--platform", "ios", "--output", tmp_path / "p"),
                   "--lora", "character device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "sock"]


def test_lora_run_refuses_inputs_that_are_not_files(converted, specials, alarm):
    fifo, zero = specials["FIFO"], specials["character device"]
    one_error_line(run_run("--model", fifo, "--prompt", "x"), "--model", "FIFO")
    one_error_line(run_run("--model", converted[0], "--lora", fifo, "--prompt", "x"), "--lora", "FIFO")
    one_error_line(run_run("--model", converted[0], "--tokenizer", zero, "--prompt", "x"), "--tokenizer",
                   "character device")


def test_read_bounded_refuses_what_is_too_big(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2049)
    with pytest.raises(files.ConversionError, match="--opt .*big: larger than 2048 bytes"):
        files.read_bounded(big, "--opt", 2048)
    assert files.read_bounded(big, "--opt", 4096) == b"x" * 2049


# 3. Output paths that cannot be made: one line each, nothing created.

def output_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    return {
        "under a file": (tmp_path / "file" / "sub" / "m.bin", ["is a file, not a folder"]),
        "in /proc": (Path("/proc/lora-convert-test/m.bin"), ["/proc/lora-convert-test"]),
        "name too long": (tmp_path / ("n" * 300) / "m.bin", ["longer than 255 bytes"]),
        "an existing folder": (tmp_path / "folder", ["is a folder"]),
        "a device": (Path("/dev/null"), ["character device"]),
    }


@pytest.mark.parametrize("case", ["under a file", "in /proc", "name too long", "an existing folder", "a device"])
def test_convert_output_paths_that_cannot_be_made(case, tmp_path):
    path, words = output_cases(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    one_error_line(run_convert(*base_args(TINY, tmp_path / "out"), "--output-tflite-file", path), *words)
    assert sorted(tmp_path.rglob("*")) == before and not Path("/proc/lora-convert-test").exists()


@pytest.mark.parametrize("case", ["under a file", "name too long", "an existing folder"])
def test_bundle_and_package_output_paths_that_cannot_be_made(case, converted, tmp_path):
    path, words = output_cases(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    target = path if path.name.endswith(".task") or case == "an existing folder" else path.with_suffix(".task")
    if case == "an existing folder":
        target = Path(f"{path}.task")
        target.mkdir()
        before = sorted(tmp_path.rglob("*"))
    result = run_bundle("--tflite-model", converted[0], "--tokenizer-model", TOKENIZER, *GEMMA_TOKENS,
                        "--output-filename", target)
    one_error_line(result, "--output-filename", *words)
    if case != "an existing folder":
        one_error_line(run_bundle("package", converted[0], "--platform", "ios", "--output", path.parent), "--output",
                       *words)
    assert sorted(tmp_path.rglob("*")) == before


def test_long_output_names_keep_their_temporary_name_short(tmp_path):
    name = "m" * 250 + ".bin"
    result = run_convert(*base_args(TINY, tmp_path / "out"), "--output-tflite-file", tmp_path / name)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [name]


# 4. Atomic writes: umask left alone, fsync before the rename, disk full as one line.

def test_atomic_output_reads_the_umask_without_setting_it_and_syncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask changes the umask process-wide"))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    with files.atomic_output(tmp_path / "new" / "x.bin") as handle:
        handle.write(b"data")
        assert partials(tmp_path)
    assert (tmp_path / "new" / "x.bin").read_bytes() == b"data" and not partials(tmp_path)
    assert synced[0].endswith(".partial") and synced[-1] == str(tmp_path / "new")
    umask = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("Umask:")).split()[1], 8)
    assert (tmp_path / "new" / "x.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_disk_full_while_converting_is_one_line(tmp_path, monkeypatch):
    calls = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "out"
    result = run_convert(*base_args(TINY, out, *LORA, "--lora-output-tflite-file", out / "lora.bin"))
    one_error_line(result, out / "model.bin", "No space left on device")
    assert not out.exists() or list(out.iterdir()) == []


def test_disk_full_while_bundling_is_one_line(converted, tmp_path, monkeypatch):
    def copy(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfileobj", copy)
    out = tmp_path / "out"
    result = run_bundle("--tflite-model", converted[0], "--tokenizer-model", TOKENIZER, *GEMMA_TOKENS,
                        "--output-filename", out / "b.task")
    one_error_line(result, out / "b.task", "No space left on device")
    result = run_bundle("package", converted[0], "--platform", "android", "--output", out)
    one_error_line(result, "model.bin", "No space left on device")
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.5 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def cli(module: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, **kwargs)


def test_a_really_full_disk_leaves_nothing(converted, small_disk):
    """The model (1 MiB) fits, the LoRA file after it does not: the finished copy goes too."""
    process = cli("bundler.cli", "package", converted[0], "--lora", converted[1], "--platform", "ios",
                  "--output", small_disk / "pkg")
    assert process.returncode == 1, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "adapter.bin" in lines[0], lines
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []
    (small_disk / "filler").write_bytes(b"x" * (1400 << 10))  # leaves less than the tensors need
    converted_ = cli("converter.cli", *base_args(TINY, small_disk / "o", *LORA))
    lines = converted_.stderr.strip().splitlines()
    assert converted_.returncode == 1 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == ["filler"]


# 5. Signals mid-run, sent to the real process: no partial file, one line, 128 + signal.

HOOK = """
import os, pathlib, sys, time
import {module}
calls = []
original = {target}
def hooked(*args, **kwargs):
    calls.append(1)
    if len(calls) == {nth}:
        pathlib.Path({mark!r}).write_text("")
        {action}
    return original(*args, **kwargs)
{target} = hooked
sys.argv[0] = {cli!r}
from {cli} import main
main()
"""


def start_hooked(cli_module: str, module: str, target: str, action: str, args, tmp_path: Path, nth: int = 1):
    """The CLI as a real process, with `action` run (and a mark file made) at the nth call of `target`."""
    mark = tmp_path / "reached"
    script = HOOK.format(module=module, target=target, nth=nth, mark=str(mark), action=action, cli=cli_module)
    process = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 240
    while not mark.exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the hook was never reached"
        time.sleep(0.05)
    assert mark.exists(), process.communicate()
    return process


def finished(process: subprocess.Popen) -> tuple[int, list[str]]:
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr.strip().splitlines()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_while_converting_leave_nothing(signum, tmp_path):
    out = tmp_path / "out"
    process = start_hooked("converter.cli", "converter.tflite", "converter.tflite.WeightFileWriter.write_stage",
                           "time.sleep(120)", base_args(TINY, out, *LORA), tmp_path)
    assert partials(out)
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)  # Ctrl-C reaches the whole process group
    else:
        process.send_signal(signum)
    code, lines = finished(process)
    assert code == 128 + signum
    assert lines == [f"error: interrupted by {signal.Signals(signum).name}; no output written"]
    assert not out.exists() or list(out.iterdir()) == []


def test_sigterm_while_bundling_and_packaging_leaves_nothing(converted, tmp_path):
    out = tmp_path / "bundle.task"
    process = start_hooked("bundler.cli", "shutil", "shutil.copyfileobj", "time.sleep(120)",
                           ["--tflite-model", converted[0], "--tokenizer-model", TOKENIZER, *GEMMA_TOKENS,
                            "--output-filename", out], tmp_path)
    process.terminate()
    assert finished(process) == (128 + signal.SIGTERM, ["error: interrupted by SIGTERM; no output written"])
    (tmp_path / "reached").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    pkg = tmp_path / "pkg"
    process = start_hooked("bundler.cli", "shutil", "shutil.copyfileobj", "time.sleep(120)",
                           ["package", converted[0], "--lora", converted[1], "--platform", "ios", "--output", pkg],
                           tmp_path, nth=2)  # the model is copied already
    process.terminate()
    assert finished(process) == (128 + signal.SIGTERM, ["error: interrupted by SIGTERM; no output written"])
    assert [p for p in pkg.rglob("*") if p.is_file()] == []


# 6. SIGBUS: an input truncated while it is mapped.

def test_an_input_truncated_while_mapped_ends_with_one_line(tiny, tmp_path):
    out = tmp_path / "out"
    weights = tiny / "model.safetensors"
    process = start_hooked("converter.cli", "converter.tflite", "converter.tflite.WeightFileWriter.write_columns",
                           f"os.truncate({str(weights)!r}, 4096)", base_args(tiny, out), tmp_path)
    code, lines = finished(process)
    assert code == 128 + signal.SIGBUS, lines
    assert lines == ["error: killed by SIGBUS (an input file was truncated or changed while it was being read); "
                     "no output written"]
    assert not out.exists() or list(out.iterdir()) == []


# 7. The progress bar's total is what the updates add up to.

@pytest.mark.parametrize("quantization", ["int8", "int4", "fp16"])
def test_progress_reaches_the_total(quantization, tmp_path):
    plan = make_plan(ConversionConfig(input_ckpt=TINY, ckpt_format="safetensors", model_type="GEMMA_2B",
                                      output_dir=tmp_path, vocab_model_file=TOKENIZER, lora_ckpt=TINY_LORA,
                                      lora_rank=8, quantization=quantization))
    done = []
    try:
        execute(plan, done.append)
    finally:
        plan.close()
    assert sum(done) == sum(item.nbytes for item in plan.base + plan.lora)
