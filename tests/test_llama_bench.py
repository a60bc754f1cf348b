"""scripts/llama_bench.py's pure parts: the instruction sets chosen from /proc/cpuinfo, llama-bench's
JSON read, and the step runner's timeout, one-line failures and peak RSS (no build here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import llama_bench  # noqa: E402  (scripts/llama_bench.py)

ZNVER3 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand bmi1 avx2 bmi2
processor\t: 1
flags\t\t: fpu sse avx512f amx_tile
"""
SAPPHIRE = "flags\t: sse4_2 avx avx2 fma f16c bmi2 avx512f avx512bw avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16\n"


def options(text: str) -> dict[str, str]:
    return dict(option.removeprefix("-D").split("=") for option in llama_bench.isa_options(text))


def test_isa_from_first_flags_line() -> None:
    chosen = options(ZNVER3)
    assert {k: v for k, v in chosen.items() if v == "ON"} == {
        "GGML_SSE42": "ON", "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_BMI2": "ON", "GGML_FMA": "ON", "GGML_F16C": "ON"}
    assert chosen["GGML_AVX512"] == chosen["GGML_AMX_TILE"] == "OFF"  # the second processor's line is not read


def test_isa_never_avx512_or_amx() -> None:
    chosen = options(SAPPHIRE)
    for option in ("GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert chosen[option] == "OFF"
    assert chosen["GGML_AVX2"] == "ON"


def test_isa_without_avx2() -> None:
    chosen = options("flags : fpu sse2 sse4_2 avx\n")
    assert (chosen["GGML_AVX"], chosen["GGML_AVX2"], chosen["GGML_FMA"], chosen["GGML_F16C"]) == ("ON", "OFF", "OFF", "OFF")
    assert set(options("").values()) == {"OFF"}


def bench_entry(prompt: int, generate: int, samples: list[float]) -> dict:
    return {"n_prompt": prompt, "n_gen": generate, "avg_ts": sum(samples) / len(samples), "samples_ts": samples}


def test_parse_bench_medians() -> None:
    text = json.dumps([bench_entry(106, 0, [40.0, 50.0, 45.0, 10.0, 47.0]), bench_entry(0, 16, [6.0, 7.0, 6.5])])
    assert llama_bench.parse_bench(text) == ((106, 45.0), (16, 6.5))


@pytest.mark.parametrize("text", ["not json", "[]", json.dumps([bench_entry(106, 0, [1.0])]),
                                  json.dumps([{"n_prompt": 1}, bench_entry(0, 16, [6.0])])])
def test_parse_bench_refuses_in_one_line(text: str) -> None:
    with pytest.raises(llama_bench.Unavailable, match="^llama-bench printed unexpected JSON") as caught:
        llama_bench.parse_bench(text)
    assert "\n" not in str(caught.value)


def test_run_failure_names_step_and_last_line() -> None:
    with pytest.raises(llama_bench.Unavailable) as caught:
        llama_bench.run("build", [sys.executable, "-c", "import sys; print('noise', file=sys.stderr); sys.exit('ninja: stopped')"])
    assert str(caught.value) == "build failed (exit 1: ninja: stopped)"
    with pytest.raises(llama_bench.Unavailable, match=r"^configure: cannot run /nonexistent/cmake \("):
        llama_bench.run("configure", ["/nonexistent/cmake"])


def test_run_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(llama_bench.TIMEOUTS, "bench", 0.5)
    with pytest.raises(llama_bench.Unavailable, match=r"^bench failed \(timed out after 0.5 s\)$"):
        llama_bench.run("bench", [sys.executable, "-c", "import time; time.sleep(30)"])


def test_run_peak_rss_is_the_childs(tmp_path: Path) -> None:
    # Measured from a small parent: Linux carries a parent's resident set at fork into the child's peak.
    out = tmp_path / "out.txt"
    child = [sys.executable, "-c", "b = bytearray(300 << 20); print(len(b))"]
    code = f"import llama_bench; print(*llama_bench.run('bench', {child!r}, output=__import__('pathlib').Path({str(out)!r})))"
    measured = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "scripts", check=True, capture_output=True, text=True)
    seconds, peak = float(measured.stdout.split()[0]), int(measured.stdout.split()[1])
    assert out.read_text() == f"{300 << 20}\n"
    assert 300 << 20 < peak < 600 << 20 and seconds > 0


def test_checkpoint_without_architectures_is_linked_with_one(tmp_path: Path) -> None:
    checkpoint, cache = tmp_path / "ckpt", tmp_path / "cache"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gemma", "vocab_size": 8}))
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    folder = llama_bench.with_architecture(checkpoint, cache)
    assert folder.parent == cache and json.loads((folder / "config.json").read_text()) == {
        "model_type": "gemma", "vocab_size": 8, "architectures": ["GemmaForCausalLM"]}
    assert (folder / "model.safetensors").resolve() == (checkpoint / "model.safetensors").resolve()
    assert json.loads((checkpoint / "config.json").read_text()) == {"model_type": "gemma", "vocab_size": 8}
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    assert llama_bench.with_architecture(checkpoint, cache) == checkpoint
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(llama_bench.Unavailable, match="config.json: no architectures and no known causal LM model_type$"):
        llama_bench.with_architecture(checkpoint, cache)
