"""lora-bundle: .task layout and round trips, determinism, validation, inspect, packaging."""
from __future__ import annotations

import contextlib
import json
import os
import plistlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from bundler.cli import main as bundle_main
from bundler.task import METADATA_ENTRY, MODEL_ENTRY, TOKENIZER_ENTRY, TaskFile
from converter import tflite
from converter.proto import llm_params_pb2

from .conftest import ROOT, TINY, TINY_LORA, TOKENIZER, base_args, run_convert

sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import PRESETS, hf_config, lora_shapes, model_shapes, random_tensor  # noqa: E402
from make_tokenizer import train  # noqa: E402

GEMMA_TOKENS = ["--start-token", "<bos>", "--stop-tokens", "<eos>", "--stop-tokens", "<end_of_turn>"]


def run_bundle(*args):
    return CliRunner().invoke(bundle_main, list(map(str, args)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Gemma converted: (base .bin, LoRA .bin)."""
    out = tmp_path_factory.mktemp("converted")
    result = run_convert(*base_args(TINY, out, "--lora-ckpt", TINY_LORA, "--lora-rank", 8,
                                    "--lora-output-tflite-file", out / "adapter.bin"))
    assert result.exit_code == 0, result.output
    return out / "model.bin", out / "adapter.bin"


def bundle(model: Path, out: Path, *extra) -> Path:
    result = run_bundle("--tflite-model", model, "--tokenizer-model", TOKENIZER, *GEMMA_TOKENS,
                        "--prompt-prefix", r"<start_of_turn>user\n",
                        "--prompt-suffix", r"<end_of_turn>\n<start_of_turn>model\n",
                        "--output-filename", out, *extra)
    assert result.exit_code == 0, result.output
    return Path(f"{out}.task") if not str(out).endswith((".task", ".litertlm")) and "--format" not in extra else out


def test_task_layout_and_round_trip(converted, tmp_path):
    path = bundle(converted[0], tmp_path / "tiny")
    assert path.name == "tiny.task"
    data = path.read_bytes()
    assert data[:8] == b"\0\0\0\0PK\x03\x04"  # MediaPipe's 4-byte pad; the web runtime keys on it
    task = TaskFile(path)
    assert list(task.entries) == [MODEL_ENTRY, TOKENIZER_ENTRY, METADATA_ENTRY]
    assert all(entry.offset % 4 == 0 for entry in task.entries.values())
    assert task.entries[MODEL_ENTRY].offset == 56
    assert task.read(MODEL_ENTRY) == converted[0].read_bytes()
    assert task.read(TOKENIZER_ENTRY) == TOKENIZER.read_bytes()
    expected = llm_params_pb2.LlmParameters(start_token="<bos>", stop_tokens=["<eos>", "<end_of_turn>"])
    expected.prompt_template.prompt_prefix = "<start_of_turn>user\n"
    expected.prompt_template.prompt_suffix = "<end_of_turn>\n<start_of_turn>model\n"
    assert task.read(METADATA_ENTRY) == expected.SerializeToString()
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_bytes_to_unicode_and_system_prompt(converted, tmp_path):
    path = bundle(converted[0], tmp_path / "b.task", "--enable-bytes-to-unicode-mapping", "--system-prompt", "Be brief.")
    params = TaskFile(path).metadata()
    assert list(params.input_output_normalizations) == [1]
    assert params.prompt_template.session_prefix == "Be brief."
    assert TaskFile(path).read(METADATA_ENTRY).startswith(b"\x2a\x05<eos>")  # stop tokens (5) before start (6)


def test_bundles_are_reproducible(converted, tmp_path):
    first = bundle(converted[0], tmp_path / "a.task")
    os.utime(converted[0], (1_000_000_000, 1_000_000_000))
    second = bundle(converted[0], tmp_path / "b.task")
    assert first.read_bytes() == second.read_bytes()


def test_inspect_reports_what_went_in(converted, tmp_path):
    path = bundle(converted[0], tmp_path / "i.task")
    result = run_bundle("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "task" and [e["name"] for e in info["entries"]] == [MODEL_ENTRY, TOKENIZER_ENTRY, METADATA_ENTRY]
    assert info["start_token"] == "<bos>" and info["stop_tokens"] == ["<eos>", "<end_of_turn>"]
    assert info["model"]["model_type"] == "GEMMA_2B" and info["model"]["lora_rank"] is None
    assert info["model"]["parameters"]["vocab_size"] == 512 and info["tokenizer"]["vocab_size"] == 512
    weights = tflite.WeightFile(converted[0])
    assert info["model"]["tensors"] == len(weights.tensors)
    assert info["model"]["bytes_by_dtype"]["INT8"] == sum(e.nbytes for e in weights.tensors.values() if e.type == tflite.INT8)
    import hashlib
    assert info["entries"][0]["sha256"] == hashlib.sha256(converted[0].read_bytes()).hexdigest()

    lora = json.loads(run_bundle("inspect", converted[1], "--json").stdout)
    assert lora["format"] == "weights" and lora["model"]["lora_rank"] == 8
    assert lora["model"]["lora_targets"] == ["self_attention.k", "self_attention.post", "self_attention.q",
                                             "self_attention.v"]
    text = run_bundle("inspect", converted[1]).stdout
    assert "LoRA rank 8 on 2 layers" in text and "start token '<bos>'" in text


def other_tokenizer(tmp_path: Path, vocab: int = 384) -> Path:
    path = tmp_path / f"tok{vocab}.model"
    train(path, vocab)
    return path


BAD_BUNDLES = {
    "start token not in tokenizer": (["--start-token", "<s>"], ["--start-token", "'<s>'", "not a piece"]),
    "stop token not in tokenizer": (["--stop-tokens", "</s>"], ["--stop-tokens", "'</s>'"]),
    "model is junk": (["--tflite-model", "{tok}"], ["TFL3"]),
    "model missing": (["--tflite-model", "{tmp}/none.bin"], ["none.bin", "not found"]),
    "model is a LoRA file": (["--tflite-model", "{lora}"], ["LoRA weights file", "rank 8"]),
    "tokenizer invalid": (["--tokenizer-model", "{model}"], ["SentencePiece"]),
    "tokenizer vocab mismatch": (["--tokenizer-model", "{other}"], ["384 pieces", "vocabulary of 512"]),
}


@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_bad_bundle_inputs(case, converted, tmp_path):
    overrides, words = BAD_BUNDLES[case]
    fill = {"tmp": tmp_path, "lora": converted[1], "model": converted[0], "tok": TOKENIZER,
            "other": other_tokenizer(tmp_path) if "{other}" in overrides else ""}
    options = {"--tflite-model": converted[0], "--tokenizer-model": TOKENIZER, "--start-token": "<bos>",
               "--output-filename": tmp_path / "out" / "x.task"}
    stops = ["<eos>"]
    for key, value in zip(overrides[::2], overrides[1::2]):
        if key == "--stop-tokens":
            stops = [value]
        else:
            options[key] = str(value).format(**fill)
    args = [str(a) for pair in options.items() for a in pair] + [a for s in stops for a in ("--stop-tokens", s)]
    result = run_bundle(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_bundle_options_are_usage_errors(converted):
    result = run_bundle("--tflite-model", converted[0])
    assert result.exit_code == 2 and "--tokenizer-model" in result.stderr and "--stop-tokens" in result.stderr


@pytest.mark.slow
def test_bundling_streams_the_model(tmp_path):
    """A 600 MB weights file bundles with a small, size-independent peak RSS."""
    model = tmp_path / "big.bin"
    params = llm_params_pb2.LlmParameters(vocab_size=512).SerializeToString()
    specs = [tflite.TensorSpec(f"t{i}", tflite.INT8, 100 << 20) for i in range(6)]
    with tflite.WeightFileWriter(model, "GEMMA_2B", specs, [(tflite.LLM_PARAMETERS, params)]) as writer:
        for spec in specs:
            writer.write(spec.name, np.full(1 << 20, 7, dtype=np.uint8), spec.nbytes - (1 << 20))
    command = [sys.executable, "-m", "bundler.cli", "--tflite-model", str(model), "--tokenizer-model", str(TOKENIZER),
               "--start-token", "<bos>", "--stop-tokens", "<eos>", "--output-filename", str(tmp_path / "big.task")]
    peak = peak_rss(command)
    imports = peak_rss([sys.executable, "-c", "import bundler.cli, bundler.build, bundler.task"])
    assert peak - imports < 100 << 20, (peak, imports)  # the model is 600 MB
    task = TaskFile(tmp_path / "big.task")
    assert task.entries[MODEL_ENTRY].size == model.stat().st_size


def peak_rss(command: list[str]) -> int:
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, process.stderr.read()
    return usage.ru_maxrss * 1024


def make_other_adapter(tmp_path: Path) -> Path:
    """A LoRA converted for a 3-layer tiny Gemma: must be refused next to the 2-layer base."""
    config = hf_config({**PRESETS["TINY_GEMMA"], "num_hidden_layers": 3})
    folder = tmp_path / "other"
    config.save_pretrained(str(folder))
    shapes = model_shapes(config)
    save_file({n: random_tensor(n, s, 0, torch.float32) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    adapter = tmp_path / "other-adapter.safetensors"
    save_file({n: random_tensor(n, s, 0, torch.float32) for n, s in lora_shapes(shapes, 8, ("q_proj", "k_proj",
              "v_proj", "o_proj")).items()}, str(adapter))
    out = tmp_path / "other-out"
    result = run_convert(*base_args(folder, out, "--lora-ckpt", adapter, "--lora-rank", 8,
                                    "--lora-output-tflite-file", out / "other.bin"))
    assert result.exit_code == 0, result.output
    return out / "other.bin"


def test_android_package_with_two_adapters(converted, tmp_path):
    task = bundle(converted[0], tmp_path / "gemma.task")
    second = tmp_path / "second.bin"
    second.write_bytes(converted[1].read_bytes())
    out = tmp_path / "android"
    result = run_bundle("package", task, "--lora", f"support={converted[1]}", "--lora", second,
                        "--platform", "android", "--output", out, "--pack-name", "gemma", "--delivery", "fast-follow",
                        "--top-k", 1)
    assert result.exit_code == 0, result.output
    assets = out / "gemma" / "src" / "main" / "assets"
    assert (assets / "gemma.task").read_bytes() == task.read_bytes()
    gradle = (out / "gemma" / "build.gradle").read_text()
    assert "id 'com.android.asset-pack'" in gradle and 'packName = "gemma"' in gradle
    assert 'deliveryType = "fast-follow"' in gradle
    push = (out / "adb_push.sh").read_text()
    assert "adb shell mkdir -p /data/local/tmp/llm" in push
    assert "adb push gemma/src/main/assets/adapter.bin /data/local/tmp/llm/adapter.bin" in push
    manifest = json.loads((assets / "manifest.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == ["support", "second"]
    assert manifest["model"]["model_type"] == "GEMMA_2B" and manifest["model"]["format"] == "task"
    assert manifest["runtime_options"] == {"maxTokens": 512, "topK": 1, "temperature": 0.8, "randomSeed": 0,
                                           "loraRanks": [8]}
    import hashlib
    files = {f["name"]: f for f in manifest["files"]}
    assert files["adapter.bin"]["sha256"] == hashlib.sha256(converted[1].read_bytes()).hexdigest()
    assert files["gemma.task"]["size"] == task.stat().st_size
    assert manifest["sideload_paths"]["second.bin"] == "/data/local/tmp/llm/second.bin"


def test_ios_package_and_plist(converted, tmp_path):
    out = tmp_path / "ios"
    result = run_bundle("package", converted[0], "--lora", converted[1], "--platform", "ios", "--output", out)
    assert result.exit_code == 0, result.output
    folder = out / "llm"
    with open(folder / "llm.plist", "rb") as handle:
        plist = plistlib.load(handle)
    assert plist["LLMModelFile"] == "model.bin" and plist["LLMOnDemandResourceTag"] == "llm"
    assert plist["LLMAdapters"] == [{"Name": "adapter", "File": "adapter.bin", "LoraRank": 8}]
    assert {f["Name"] for f in plist["LLMFiles"]} == {"model.bin", "adapter.bin"}
    assert json.loads((folder / "manifest.json").read_text())["model"]["format"] == "weights"


def test_package_refuses_adapter_for_another_base(converted, tmp_path):
    other = make_other_adapter(tmp_path)
    result = run_bundle("package", converted[0], "--lora", other, "--platform", "android", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "other dimensions" in result.stderr
    result = run_bundle("package", converted[0], "--lora", converted[0], "--platform", "ios", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "not a LoRA weights file" in result.stderr
    result = run_bundle("package", converted[0], "--lora", f"a={converted[1]}", "--lora", f"a={converted[1]}",
                        "--platform", "ios", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "repeated: a" in result.stderr


def test_package_warns_about_store_limits(converted, tmp_path, monkeypatch):
    from bundler import package as package_module

    monkeypatch.setitem(package_module.ANDROID_PACK_LIMITS, "on-demand", 1000)
    result = run_bundle("package", converted[0], "--platform", "android", "--delivery", "on-demand",
                        "--output", tmp_path / "a")
    assert result.exit_code == 0 and "warning: the asset pack holds" in result.stderr
    monkeypatch.setattr(package_module, "IOS_ODR_TAG_LIMIT", 1000)
    result = run_bundle("package", converted[0], "--platform", "ios", "--output", tmp_path / "i")
    assert result.exit_code == 0 and "On-Demand Resources tag holds at most" in result.stderr


def test_litertlm_container_sections(converted, tmp_path):
    import litert_lm_builder

    path = bundle(converted[0], tmp_path / "tiny.litertlm", "--format", "litertlm")
    with open(path, "rb") as handle:
        assert handle.read(8)[:4] == b"LITE"
    with open(tmp_path / "peek.txt", "w") as out:
        litert_lm_builder.peek_litertlm_file(str(path), str(tmp_path / "peek"), out)
    peek = (tmp_path / "peek.txt").read_text()
    assert "tf_lite_artisan_text_decoder" in peek and "SP_Tokenizer" in peek and "LlmMetadataProto" in peek


SWIFTSHADER_ICD = Path("/usr/lib/chromium/vk_swiftshader_icd.json")


@contextlib.contextmanager
def swiftshader_vulkan():
    """SwiftShader as the Vulkan driver of the LiteRT-LM engines started inside (their worker
    processes inherit it); skipped without it unless REQUIRE_RUNTIME is set."""
    if not SWIFTSHADER_ICD.exists():
        message = f"no Vulkan driver at {SWIFTSHADER_ICD} (apt-get install chromium libvulkan1)"
        if os.environ.get("REQUIRE_RUNTIME"):
            pytest.fail(message)
        pytest.skip(message)
    before = os.environ.get("VK_ICD_FILENAMES")
    os.environ["VK_ICD_FILENAMES"] = str(SWIFTSHADER_ICD)
    try:
        yield
    finally:
        if before is None:
            del os.environ["VK_ICD_FILENAMES"]
        else:
            os.environ["VK_ICD_FILENAMES"] = before


def run_litertlm(model: Path, prompts: str | list[str], max_tokens: int, lora: Path | None = None,
                 cpu: bool = False) -> dict:
    """Greedy texts of LiteRT-LM's GPU backend (CPU with `cpu`) through `--runtime litertlm`'s runtime
    (one engine): {"base": text(s), "lora": text(s) or None}, a list for a list of prompts."""
    from harness.litertlm_runtime import LiteRTLMRuntime
    from harness.generate import Options

    greedy = Options(max_tokens, top_k=1, temperature=0.0)
    asked = [prompts] if isinstance(prompts, str) else prompts
    driver = contextlib.nullcontext() if cpu else swiftshader_vulkan()
    with driver, LiteRTLMRuntime(model, greedy, "cpu" if cpu else "gpu") as runtime:
        if lora is not None:
            runtime.add_adapter("lora", lora)
        texts = {name: [runtime.generate(prompt, greedy, name).text for prompt in asked]
                 for name in ("base", "lora") if name == "base" or lora is not None}
    texts.setdefault("lora", None)
    return texts if not isinstance(prompts, str) else {n: t[0] if t else None for n, t in texts.items()}


@pytest.mark.runtime
def test_litertlm_runs_on_the_gpu_backend_with_and_without_lora(converted, tmp_path):
    """LiteRT-LM's GPU executor loads our .litertlm and our LoRA .bin (zero-padded to 1 MiB by
    the converter) and generates deterministically; the adapter changes the output."""
    path = bundle(converted[0], tmp_path / "tiny.litertlm", "--format", "litertlm")
    first = run_litertlm(path, "one two three", 24, converted[1])
    second = run_litertlm(path, "one two three", 24, converted[1])
    assert first == second
    assert first["base"] and first["lora"] and first["base"] != first["lora"]
