"""llama.cpp, built from source, as the same-run yardstick of scripts/bench_reference.py.

    flock /tmp/heavy.lock python scripts/llama_bench.py CHECKPOINT_FOLDER [--gguf X.gguf] [--cache DIR]

Fetches the pinned llama-cpp-python sdist with pip (it vendors llama.cpp's source; its sha256 is
checked), extracts vendor/llama.cpp into the cache folder and builds only `llama-bench` there
(CMake Release, no -march=native: the instruction sets are chosen from /proc/cpuinfo, AVX2/FMA/F16C
when present, never AVX-512 or AMX). Then converts a Hugging Face checkpoint folder to a Q8_0 GGUF
with the vendored convert_hf_to_gguf.py (cached beside the checkpoint) and runs
`llama-bench -t THREADS -p PROMPT -n GENERATE -o json`: prompt and generation tokens/s (medians of
its repetitions), peak RSS (the run's maximum resident set from os.wait4, mapped file pages
included), and load seconds: the wall time of a one-token `llama-bench` process less the time it
measured for that token (process start, mapping the file, any weight repacking, context set-up).
Each step has a timeout; a missing tool or a failed step raises `Unavailable` with one line.
Everything it writes goes under the cache folder and the GGUF path.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = Path(tempfile.gettempdir()) / "lora-convert-bench" / "llama.cpp"
# /proc/cpuinfo flag -> ggml's CMake option; each is set ON or OFF explicitly (GGML_NATIVE=OFF).
ISA = {"sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "bmi2": "GGML_BMI2", "fma": "GGML_FMA",
       "f16c": "GGML_F16C"}
NEVER = ("GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
         "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # unverified here (the AMX one advertised faults)
TIMEOUTS = {"download": 900, "configure": 300, "build": 3600, "convert": 3600, "bench": 1200}


class Unavailable(RuntimeError):
    """llama.cpp cannot be built or run here; the message says why in one line."""


@dataclass(frozen=True)
class Figures:
    load_s: float
    prompt_tokens: int
    prompt_tok_s: float
    generated: int
    generate_tok_s: float
    peak_rss: int
    threads: int


def isa_options(cpuinfo: str) -> list[str]:
    """CMake -D options for ggml's CPU backend: the x86 extensions the first `flags` line of a
    /proc/cpuinfo text lists ON, the others OFF, AVX-512/AVX-VNNI/AMX always OFF."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return ([f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in ISA.items()]
            + [f"-D{option}=OFF" for option in NEVER])


def parse_bench(text: str) -> tuple[tuple[int, float], tuple[int, float]]:
    """(prompt tokens, tokens/s), (generated tokens, tokens/s) from `llama-bench -o json`: the medians
    of each test's repetitions."""
    try:
        tests = json.loads(text)
        prompt = [t for t in tests if t["n_prompt"] and not t["n_gen"]]
        generate = [t for t in tests if t["n_gen"] and not t["n_prompt"]]
        if len(prompt) != 1 or len(generate) != 1:
            raise ValueError("expected one prompt test and one generation test")
        return ((prompt[0]["n_prompt"], statistics.median(prompt[0]["samples_ts"])),
                (generate[0]["n_gen"], statistics.median(generate[0]["samples_ts"])))
    except (ValueError, TypeError, KeyError, statistics.StatisticsError) as exc:
        raise Unavailable(f"llama-bench printed unexpected JSON ({exc})") from None


def run(step: str, command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        output: Path | None = None) -> tuple[float, int]:
    """Run `command` within its step's timeout, stdout into `output` (or discarded); seconds and peak
    RSS in bytes (os.wait4). A failure raises Unavailable with the step and the last stderr line."""
    with tempfile.TemporaryFile() as err, open(output or os.devnull, "wb") as out:
        start = time.perf_counter()
        try:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        except OSError as exc:
            raise Unavailable(f"{step}: cannot run {command[0]} ({exc.strerror})") from None
        timer = threading.Timer(TIMEOUTS[step], process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        seconds = time.perf_counter() - start
        if process.returncode:
            err.seek(0)
            lines = [line for line in err.read().decode(errors="replace").splitlines() if line.strip()]
            reason = f"timed out after {TIMEOUTS[step]} s" if seconds >= TIMEOUTS[step] else \
                f"exit {process.returncode}: {lines[-1].strip()[:200] if lines else 'no message'}"
            raise Unavailable(f"{step} failed ({reason})")
    return seconds, usage.ru_maxrss * 1024


def sdist(cache: Path) -> Path:
    """The pinned sdist in `cache`, downloaded with pip if missing; its sha256 checked."""
    path = cache / SDIST
    if not path.is_file():
        run("download", [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                         "--no-binary", "llama-cpp-python", "--quiet", "-d", str(cache)])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != SHA256:
        raise Unavailable(f"{path}: sha256 {digest.hexdigest()}, expected {SHA256}")
    return path


def source(cache: Path) -> Path:
    """vendor/llama.cpp of the sdist, extracted once into `cache`/src."""
    folder = cache / "src"
    if (folder / "CMakeLists.txt").is_file():
        return folder
    archive = sdist(cache)
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tempfile.TemporaryDirectory(dir=cache) as temp, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse links and paths out of `temp`
            tar.extractall(temp, members, filter="data")
        else:
            tar.extractall(temp, members)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(Path(temp) / prefix, folder)
    return folder


def llama_bench(cache: Path = CACHE) -> tuple[Path, float]:
    """The `llama-bench` binary, built in `cache` if missing, and the seconds building took (0 if reused)."""
    binary = cache / "build" / "bin" / "llama-bench"
    if binary.is_file():
        return binary, 0.0
    for tool in ("cmake", "c++", "cc"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (needed to build llama.cpp)")
    cache.mkdir(parents=True, exist_ok=True)
    src = source(cache)
    cpuinfo = Path("/proc/cpuinfo").read_text() if platform.machine() in ("x86_64", "AMD64") else ""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure, _ = run("configure", [
        "cmake", "-S", str(src), "-B", str(cache / "build"), *generator, "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DGGML_CCACHE=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", *(isa_options(cpuinfo) if cpuinfo else [])])
    build, _ = run("build", ["cmake", "--build", str(cache / "build"), "--target", "llama-bench", "-j", "2"])
    return binary, configure + build


def with_architecture(checkpoint: Path, cache: Path) -> Path:
    """`checkpoint`, or where its config.json names no `architectures` (scripts/make_checkpoint.py's do not),
    a folder in `cache` of links to its files beside a config.json naming transformers' causal LM class
    for its `model_type`: convert_hf_to_gguf.py picks its converter by that name."""
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("architectures"):
        return checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise Unavailable(f"{checkpoint / 'config.json'}: no architectures and no known causal LM model_type")
    folder = cache / "checkpoint"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path.resolve())
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def gguf(checkpoint: Path, output: Path, cache: Path = CACHE) -> float:
    """Convert the Hugging Face `checkpoint` folder to a Q8_0 `output` GGUF if missing; seconds (0 if reused)."""
    if output.is_file():
        return 0.0
    src = source(cache).resolve()  # the converter runs there: paths it gets are absolute
    checkpoint = with_architecture(checkpoint.resolve(), cache)
    temp = output.resolve().with_name(f".{output.name}.partial")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    try:
        seconds, _ = run("convert", [sys.executable, str(src / "convert_hf_to_gguf.py"), str(checkpoint),
                                     "--outtype", "q8_0", "--outfile", str(temp)], cwd=src, env=env)
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
    return seconds


def measure(model: Path, binary: Path, threads: int = 2, prompt: int = 106, generate: int = 16) -> Figures:
    """llama-bench's figures for `model` (see the module's docstring)."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "bench.json"
        base = [str(binary), "-m", str(model), "-t", str(threads), "-o", "json"]
        _, peak = run("bench", [*base, "-p", str(prompt), "-n", str(generate)], output=result)
        (prompt_tokens, prompt_tok_s), (generated, generate_tok_s) = parse_bench(result.read_text())
        wall, _ = run("bench", [*base, "-p", "1", "-n", "0", "-r", "1", "--no-warmup"], output=result)
        token_s = json.loads(result.read_text())[0]["avg_ns"] / 1e9
    return Figures(load_s=wall - token_s, prompt_tokens=prompt_tokens, prompt_tok_s=prompt_tok_s, generated=generated,
                   generate_tok_s=generate_tok_s, peak_rss=peak, threads=threads)


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gguf", "gguf_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The Q8_0 GGUF [default: CHECKPOINT-q8_0.gguf beside the folder; converted if missing].")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=CACHE, show_default=True,
              help="Where the sdist, the source and the build go.")
@click.option("--threads", default=2, show_default=True)
@click.option("--prompt-tokens", default=106, show_default=True)
@click.option("--generate-tokens", default=16, show_default=True)
def main(checkpoint: Path, gguf_path: Path | None, cache: Path, threads: int, prompt_tokens: int,
         generate_tokens: int) -> None:
    """Build llama-bench, convert CHECKPOINT to Q8_0 and print llama.cpp's figures as JSON."""
    output = gguf_path or checkpoint.with_name(f"{checkpoint.name}-q8_0.gguf")
    try:
        binary, build_s = llama_bench(cache)
        convert_s = gguf(checkpoint, output, cache)
        figures = measure(output, binary, threads, prompt_tokens, generate_tokens)
    except Unavailable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps({"build_s": build_s, "convert_s": convert_s, "gguf_bytes": output.stat().st_size,
                           "load_average": os.getloadavg(), **asdict(figures)}))


if __name__ == "__main__":
    main()
