"""lora-bundle on hostile input: shell injection through file names, outputs landing on each
other, invalid manifests, crafted .task zips and embedded tokenizers, bad text options, and
packages that are all there or not at all. Each refusal is one `error:` line, exit 1."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bundler.task import METADATA_ENTRY, MODEL_ENTRY, TOKENIZER_ENTRY, TaskFile

from .conftest import TOKENIZER
from .test_bundler import bundle, converted, run_bundle  # noqa: F401 (converted is a fixture)

ADB_LOG = "adb-args"
FAKE_ADB = """#!/bin/sh
for arg in "$@"; do printf '%s\\0' "$arg" >> "$ADB_LOG"; done
printf '\\n\\0' >> "$ADB_LOG"
"""


def refused(result, *words: str) -> str:
    """The one error line of a refused run (exit 1, no traceback), holding every word."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def nothing_left(folder: Path) -> None:
    """No output and no temporary file or folder beside it."""
    assert not folder.exists()
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")]


def copy(source: Path, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(source.read_bytes())
    return destination


def package(model: Path, out: Path, *extra, platform: str = "android"):
    return run_bundle("package", model, "--platform", platform, "--output", out, *extra)


# --- adb_push.sh: file names are data, never shell code ---------------------------------------

def run_push_script(out: Path, tmp_path: Path) -> list[list[str]]:
    """Run the generated adb_push.sh from another folder with a fake adb that logs its argv."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB)
    (bin_dir / "adb").chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / ADB_LOG
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ADB_LOG": str(log)}
    subprocess.run(["sh", str(out / "adb_push.sh")], cwd=elsewhere, env=env, check=True, timeout=30)
    calls = log.read_bytes().split(b"\n\0")[:-1]
    return [[os.fsdecode(arg) for arg in call.split(b"\0") if arg] for call in calls]


HOSTILE_NAMES = ["a';touch INJECTED;'.bin", "b $(touch INJECTED) `touch INJECTED` 'c'.bin", "d$HOME&;{e,f}!#x.bin",
                 "ünïcödé 空白.bin"]


def test_adb_push_script_passes_hostile_names_as_plain_arguments(converted, tmp_path):
    model = copy(converted[0], tmp_path / "in" / HOSTILE_NAMES[0])
    loras = [copy(converted[1], tmp_path / "in" / name) for name in HOSTILE_NAMES[1:]]
    out = tmp_path / "android"
    result = package(model, out, *[a for i, p in enumerate(loras) for a in ("--lora", f"a{i}={p}")])
    assert result.exit_code == 0, result.output
    calls = run_push_script(out, tmp_path)
    names = [model.name] + [p.name for p in loras]
    assert calls == [["shell", "mkdir", "-p", "/data/local/tmp/llm"]] + [
        ["push", f"llm/src/main/assets/{name}", f"/data/local/tmp/llm/{name}"] for name in names]
    assert not list(tmp_path.rglob("INJECTED")) and not list(Path.cwd().glob("INJECTED"))
    for name in names:  # what the script pushes is there, and is what went in
        assert (out / "llm" / "src" / "main" / "assets" / name).read_bytes() == (tmp_path / "in" / name).read_bytes()


UNSAFE_FILE_NAMES = {
    "newline": "a\nb.bin", "carriage return": "a\rb.bin", "control character": "a\x01b.bin",
    "leading dash": "-rf.bin", "leading dot (Android skips it)": ".hidden.bin", "trailing tilde": "backup.bin~",
    "trailing dot": "name.", "colon": "c:d.bin", "wildcard": "a*.bin", "backslash": "a\\b.bin",
    "not UTF-8": os.fsdecode(b"\xff\xfe.bin"),
}


@pytest.mark.parametrize("case", UNSAFE_FILE_NAMES)
def test_package_refuses_names_an_app_cannot_carry(case, converted, tmp_path):
    lora = copy(converted[1], tmp_path / "in" / UNSAFE_FILE_NAMES[case])
    out = tmp_path / "out"
    line = refused(package(converted[0], out, "--lora", f"x={lora}"), "--lora", "rename the file")
    assert "\n" not in line and "\r" not in line
    nothing_left(out)


@pytest.mark.parametrize("name", ["bad-name", "9lives", "ok\n", "", "x" * 65, "naïve"])
def test_package_refuses_adapter_names_that_are_not_identifiers(name, converted, tmp_path):
    out = tmp_path / "out"
    refused(package(converted[0], out, "--lora", f"{name}={converted[1]}"), "--lora name", "letters, digits and _")
    nothing_left(out)


def test_default_adapter_name_says_how_to_choose_one(converted, tmp_path):
    lora = copy(converted[1], tmp_path / "2024 adapter.bin")
    refused(package(converted[0], tmp_path / "out", "--lora", lora), "give NAME=PATH")
    result = package(converted[0], tmp_path / "out", "--lora", f"mine={lora}")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("pack_name", ["llm\n", "a b", "llm'", "x" * 65, "../up"])
def test_package_refuses_pack_names_that_would_escape(pack_name, converted, tmp_path):
    out = tmp_path / "out"
    refused(package(converted[0], out, "--pack-name", pack_name), "--pack-name")
    nothing_left(out)


# --- no output lands on another ---------------------------------------------------------------

COLLISIONS = {
    "LoRA named manifest.json (iOS)": ("ios", ["manifest.json"], "the package's own manifest.json"),
    "LoRA named manifest.json (Android)": ("android", ["manifest.json"], "the package's own manifest.json"),
    "case-folded manifest": ("ios", ["Manifest.JSON"], "the package's own manifest.json"),
    "LoRA named like the plist": ("ios", ["llm.plist"], "the package's own llm.plist"),
    "two LoRAs with one basename": ("android", ["a/adapter.bin", "b/adapter.bin"], "a/adapter.bin"),
    "LoRA named like the model": ("ios", ["x/model.bin"], "MODEL"),
    "names differing in case": ("ios", ["a/Adapter.bin", "b/adapter.BIN"], "Adapter.bin"),
}


@pytest.mark.parametrize("case", COLLISIONS)
def test_package_refuses_inputs_that_would_overwrite_an_output(case, converted, tmp_path):
    platform, names, culprit = COLLISIONS[case]
    loras = [copy(converted[1], tmp_path / "in" / name) for name in names]
    out = tmp_path / "out"
    result = package(converted[0], out, *[a for i, p in enumerate(loras) for a in ("--lora", f"l{i}={p}")],
                     platform=platform)
    refused(result, "would land on the same file as", culprit)
    nothing_left(out)
    assert all(p.read_bytes() == converted[1].read_bytes() for p in loras)


# --- manifests: valid JSON, options in range ----------------------------------------------------

BAD_OPTIONS = [("--max-tokens", "0"), ("--max-tokens", "-5"), ("--max-tokens", str(2**31)), ("--top-k", "0"),
               ("--top-k", "-1"), ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-0.5"),
               ("--random-seed", str(2**31)), ("--random-seed", str(-2**31 - 1))]


@pytest.mark.parametrize("option,value", BAD_OPTIONS)
def test_package_refuses_runtime_options_the_runtime_cannot_take(option, value, converted, tmp_path):
    out = tmp_path / "out"
    refused(package(converted[0], out, option, value, platform="ios"), f"{option} {value}")
    nothing_left(out)


def strict_json(path: Path):
    def no_constant(name):
        raise AssertionError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=no_constant)


def test_manifest_is_strict_json_at_the_edges_of_the_ranges(converted, tmp_path):
    out = tmp_path / "out"
    result = package(converted[0], out, "--max-tokens", 2**31 - 1, "--top-k", 1, "--temperature", 0,
                     "--random-seed", -2**31, platform="ios")
    assert result.exit_code == 0, result.output
    options = strict_json(out / "llm" / "manifest.json")["runtime_options"]
    assert options == {"maxTokens": 2**31 - 1, "topK": 1, "temperature": 0.0, "randomSeed": -2**31, "loraRanks": []}


# --- the output folder --------------------------------------------------------------------------

def test_package_output_that_is_a_file_or_under_one(converted, tmp_path):
    file = tmp_path / "file"
    file.write_bytes(b"mine")
    refused(package(converted[0], file), "--output", "is a file, not a folder")
    refused(package(converted[0], file / "sub"), "--output", "is a file, not a folder")
    assert file.read_bytes() == b"mine"


def test_package_refuses_a_folder_of_other_files_and_one_holding_an_input(converted, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "build.gradle").write_text("mine")
    refused(package(converted[0], project), "is a folder with other files")
    assert (project / "build.gradle").read_text() == "mine" and sorted(p.name for p in project.iterdir()) == [
        "build.gradle", "src"]

    out = tmp_path / "dist"
    assert package(converted[0], out, platform="ios").exit_code == 0
    inside = out / "llm" / "model.bin"
    before = inside.read_bytes()
    refused(package(inside, out, platform="ios"), "holds the input", "choose another folder")
    assert inside.read_bytes() == before


def test_package_replaces_an_earlier_package_as_a_whole(converted, tmp_path):
    out = tmp_path / "dist"
    assert package(converted[0], out, "--lora", f"old={converted[1]}").exit_code == 0
    assert (out / "llm" / "src" / "main" / "assets" / "adapter.bin").exists()
    result = package(converted[0], out, "--pack-name", "gemma")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adb_push.sh", "gemma"]
    assert sorted(p.name for p in (out / "gemma" / "src" / "main" / "assets").iterdir()) == ["manifest.json",
                                                                                              "model.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dist")]


def test_a_failing_package_leaves_nothing_and_keeps_the_earlier_one(converted, tmp_path, monkeypatch):
    from bundler import package as package_module
    from converter.errors import ConversionError

    def disk_full(*_):
        raise ConversionError("manifest.json: cannot write (No space left on device)")

    out = tmp_path / "dist"
    monkeypatch.setattr(package_module, "write_ios", disk_full)
    refused(package(converted[0], out, platform="ios"), "No space left on device")
    nothing_left(out)

    monkeypatch.undo()
    assert package(converted[0], out, platform="ios").exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(package_module, "write_ios", disk_full)
    refused(package(converted[0], out, "--lora", f"x={converted[1]}", platform="ios"), "No space left")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dist")]


def test_package_interrupted_leaves_nothing(converted, tmp_path):
    """SIGTERM while the files are copied: the staged folder goes, no output appears."""
    out = tmp_path / "dist"
    script = (
        "import os, signal, sys\n"
        "from bundler import package\n"
        "copy = package.copy_file\n"
        "def slow(source, destination):\n"
        "    copy(source, destination)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "package.copy_file = slow\n"
        "signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))\n"
        "from bundler.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    process = subprocess.run([sys.executable, "-c", script, "package", str(converted[0]), "--platform", "ios",
                              "--output", str(out)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert process.returncode != 0
    nothing_left(out)


# --- .litertlm: reproducible ---------------------------------------------------------------------

def test_litertlm_bundles_are_byte_reproducible(converted, tmp_path):
    import litert_lm_builder

    first = bundle(converted[0], tmp_path / "a.litertlm", "--format", "litertlm")
    os.utime(converted[0], (1_000_000_000, 1_000_000_000))
    second = bundle(converted[0], tmp_path / "b.litertlm", "--format", "litertlm")
    assert first.read_bytes() == second.read_bytes()
    other = bundle(converted[0], tmp_path / "c.litertlm", "--format", "litertlm", "--system-prompt", "Be brief.")
    with open(tmp_path / "peek.txt", "w") as text, open(tmp_path / "peek-other.txt", "w") as text_other:
        litert_lm_builder.peek_litertlm_file(str(first), str(tmp_path / "peek"), text)
        litert_lm_builder.peek_litertlm_file(str(other), str(tmp_path / "peek-other"), text_other)
    peek, peek_other = (tmp_path / "peek.txt").read_text(), (tmp_path / "peek-other.txt").read_text()
    assert "creation_timestamp, Value (String): 1980-01-01T00:00:00+00:00" in peek
    uuid_line = [line for line in peek.splitlines() if "Key: uuid" in line]
    assert len(uuid_line) == 1 and uuid_line[0] not in peek_other  # the uuid follows the content
    assert "tf_lite_artisan_text_decoder" in peek and "SP_Tokenizer" in peek


# --- crafted .task zips and embedded tokenizers ------------------------------------------------

def central_record(data: bytes, name: str) -> int:
    """Offset of the central directory record of entry `name`."""
    at = data.index(b"PK\x01\x02")
    while True:
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + name_length] == name.encode():
            return at
        at = data.index(b"PK\x01\x02", at + 46)


def with_field(data: bytes, name: str, field: int, value: int) -> bytes:
    """`data` with a 32-bit field of `name`'s central record set (20/24: sizes, 42: local header)."""
    at = central_record(data, name) + field
    return data[:at] + struct.pack("<L", value) + data[at + 4:]


def with_entry_bytes(data: bytes, task: TaskFile, name: str, fill: bytes) -> bytes:
    entry = task.entries[name]
    junk = (fill * entry.size)[:entry.size]
    return data[:entry.offset] + junk + data[entry.offset + entry.size:]


def rezip(entries: list[tuple[str, bytes]]) -> bytes:
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # duplicate names, on purpose
        for name, content in entries:
            archive.writestr(name, content)
    return buffer.getvalue()


def sized(data: bytes, name: str, size: int) -> bytes:
    """`data` with entry `name`'s central record claiming `size` bytes (stored: both sizes)."""
    return with_field(with_field(data, name, 20, size), name, 24, size)


def parts(task: TaskFile) -> list[tuple[str, bytes]]:
    model = task.entries[MODEL_ENTRY]
    with open(task.path, "rb") as handle:
        handle.seek(model.offset)
        return [(MODEL_ENTRY, handle.read(model.size))] + [(n, task.read(n)) for n in (TOKENIZER_ENTRY, METADATA_ENTRY)]


def size(task: TaskFile, name: str) -> int:
    return task.entries[name].size


# case: (the crafted bytes from a good bundle's bytes and TaskFile, words the error line must hold)
CRAFTED_TASKS = {
    "truncated central directory": (lambda data, task: data[:-30], ["not a readable .task bundle"]),
    "not a zip at all": (lambda data, task: b"\0\0\0\0PK" + b"\x17" * 4000, ["not a readable .task bundle"]),
    "entry size past the end": (lambda data, task: sized(data, TOKENIZER_ENTRY, 2**31),
                                [TOKENIZER_ENTRY, "run past the end"]),
    "sizes that disagree": (lambda data, task: with_field(data, TOKENIZER_ENTRY, 24, size(task, TOKENIZER_ENTRY) + 1),
                            [TOKENIZER_ENTRY, "sizes differ"]),
    "local header past the end": (lambda data, task: with_field(data, METADATA_ENTRY, 42, len(data) + 1000),
                                  [METADATA_ENTRY, "no local header"]),
    "local header of another entry": (lambda data, task: with_field(data, METADATA_ENTRY, 42, 4),
                                      [METADATA_ENTRY, "names another entry"]),
    "overlapping entries": (lambda data, task: sized(data, TOKENIZER_ENTRY, size(task, TOKENIZER_ENTRY) + 40),
                            ["overlap"]),
    "duplicate entry": (lambda data, task: rezip(parts(task) + parts(task)[2:]), [METADATA_ENTRY, "appears twice"]),
    "missing METADATA": (lambda data, task: rezip(parts(task)[:2]), ["lacks entry METADATA"]),
    "garbage tokenizer": (lambda data, task: with_entry_bytes(data, task, TOKENIZER_ENTRY, b"\xde\xad\xbe\xef"),
                          [f"entry {TOKENIZER_ENTRY}: not a valid SentencePiece model"]),
    "garbage METADATA": (lambda data, task: with_entry_bytes(data, task, METADATA_ENTRY, b"\xff"),
                         [f"entry {METADATA_ENTRY} is not a valid LlmParameters"]),
    "garbage model": (lambda data, task: with_entry_bytes(data, task, MODEL_ENTRY, b"\x01\x02"),
                      [f"in its entry {MODEL_ENTRY}"]),
}


@pytest.fixture(scope="module")
def good_task(converted, tmp_path_factory) -> Path:
    return bundle(converted[0], tmp_path_factory.mktemp("task") / "good.task")


@pytest.mark.parametrize("case", CRAFTED_TASKS)
def test_crafted_task_gives_one_line_in_inspect_and_package(case, good_task, tmp_path):
    craft, words = CRAFTED_TASKS[case]
    data = craft(good_task.read_bytes(), TaskFile(good_task))
    path = tmp_path / "crafted.task"
    path.write_bytes(data)
    refused(run_bundle("inspect", path), str(path), *words)
    if "tokenizer" not in case and "METADATA" not in case:  # package reads the model entry only
        refused(package(path, tmp_path / "out"), str(path), *words)
        nothing_left(tmp_path / "out")
    assert path.read_bytes() == data


def test_corrupt_tokenizer_inside_a_weights_file(converted, tmp_path):
    data = converted[0].read_bytes()
    spm = TOKENIZER.read_bytes()
    at = data.index(spm)
    path = tmp_path / "model.bin"
    path.write_bytes(data[:at] + b"\x7f" * len(spm) + data[at + len(spm):])
    refused(run_bundle("inspect", path), str(path), "metadata spm_vocab_model: not a valid SentencePiece model")


def test_litertlm_and_task_where_a_weights_file_belongs(converted, good_task, tmp_path):
    litertlm = bundle(converted[0], tmp_path / "m.litertlm", "--format", "litertlm")
    refused(package(litertlm, tmp_path / "out"), "is a .litertlm bundle")
    refused(package(converted[0], tmp_path / "out", "--lora", f"x={good_task}"), "--lora", "is a .task bundle")
    for model in (good_task, litertlm):
        refused(run_bundle("--tflite-model", model, "--tokenizer-model", TOKENIZER, "--start-token", "<bos>",
                           "--stop-tokens", "<eos>", "--output-filename", tmp_path / "x.task"),
                "--tflite-model", f"is a .{model.suffix[1:]} bundle", "weights .bin")
    nothing_left(tmp_path / "x.task")
    nothing_left(tmp_path / "out")


# --- bundling: text options and output -----------------------------------------------------------

def bundle_args(model: Path, out: Path, **options) -> list:
    values = {"--tflite-model": model, "--tokenizer-model": TOKENIZER, "--start-token": "<bos>",
              "--stop-tokens": "<eos>", "--output-filename": out, **options}
    return [str(a) for pair in values.items() for a in pair]


BAD_TEXT = {
    "start token not UTF-8": ("--start-token", os.fsdecode(b"<bos\xff>"), "not valid UTF-8"),
    "stop token not UTF-8": ("--stop-tokens", os.fsdecode(b"\xc3("), "not valid UTF-8"),
    "prompt prefix not UTF-8": ("--prompt-prefix", os.fsdecode(b"user\xa0\xa1"), "not valid UTF-8"),
    "system prompt not UTF-8": ("--system-prompt", os.fsdecode(b"\xed\xa0\x80"), "not valid UTF-8"),
    "empty stop token": ("--stop-tokens", "", "is not a piece"),
    "huge prompt suffix": ("--prompt-suffix", "x" * (300 << 10), "more than the 256 KiB"),
    "huge system prompt": ("--system-prompt", "é" * (130 << 10), "more than the 256 KiB"),
}


@pytest.mark.parametrize("fmt", ["task", "litertlm"])
@pytest.mark.parametrize("case", BAD_TEXT)
def test_bundle_refuses_bad_text_options(case, fmt, converted, tmp_path):
    option, value, words = BAD_TEXT[case]
    out = tmp_path / f"x.{fmt}"
    refused(run_bundle(*bundle_args(converted[0], out, **{option: value}), "--format", fmt), option, words)
    nothing_left(out)


def test_bundle_takes_the_longest_prompt_allowed(converted, tmp_path):
    out = bundle(converted[0], tmp_path / "long.task", "--system-prompt", "y" * (256 << 10))
    assert TaskFile(out).metadata().prompt_template.session_prefix == "y" * (256 << 10)


def test_bundle_output_that_is_a_folder(converted, tmp_path):
    folder = tmp_path / "x.task"
    (folder / "keep").mkdir(parents=True)
    refused(run_bundle(*bundle_args(converted[0], folder)), "--output-filename", "is a folder")
    refused(run_bundle(*bundle_args(converted[0], tmp_path / "x")), "--output-filename", "is a folder")
    assert [p.name for p in folder.iterdir()] == ["keep"]


@pytest.mark.parametrize("args", [["--platform", "windows"], ["--platform", "android", "--delivery", "later"],
                                  ["--platform", "ios", "--max-tokens", "many"]])
def test_package_choice_options_are_usage_errors(args, converted, tmp_path):
    result = run_bundle("package", converted[0], "--output", tmp_path / "out", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    nothing_left(tmp_path / "out")


def test_tokenizer_that_makes_sentencepiece_fail_with_a_decode_error(converted, good_task, tmp_path):
    """A byte piece spelled with an invalid UTF-8 byte: sentencepiece's own error message cannot
    be decoded (UnicodeDecodeError, not RuntimeError)."""
    good = TOKENIZER.read_bytes()
    assert good.count(b"<0xD6>") == 1
    tokenizer = tmp_path / "bad.model"
    tokenizer.write_bytes(good.replace(b"<0xD6>", b"<0\xc1D6>"))
    refused(run_bundle(*bundle_args(converted[0], tmp_path / "x.task", **{"--tokenizer-model": tokenizer})),
            "--tokenizer-model", str(tokenizer), "not a valid SentencePiece model")
    nothing_left(tmp_path / "x.task")
    task = tmp_path / "bad.task"
    task.write_bytes(good_task.read_bytes().replace(b"<0xD6>", b"<0\xc1D6>"))
    refused(run_bundle("inspect", task), f"entry {TOKENIZER_ENTRY}: not a valid SentencePiece model")


def test_package_on_a_full_disk_says_so_in_one_line(converted, tmp_path, monkeypatch):
    import errno

    from bundler import package as package_module

    copied = []

    def copy_then_fill(source, destination):
        if copied:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))
        destination.parent.mkdir(parents=True)
        destination.write_bytes(source.read_bytes())
        copied.append(destination)

    monkeypatch.setattr(package_module, "copy_file", copy_then_fill)
    out = tmp_path / "dist"
    refused(package(converted[0], out, "--lora", f"x={converted[1]}"), "--output", "No space left on device")
    assert copied and not copied[0].exists()
    nothing_left(out)
