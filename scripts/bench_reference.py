"""Benchmark: the reference CPU runtime's speed and memory on a GEMMA_2B-shaped int8 file, and on
the tiny fixture model.

    flock /tmp/heavy.lock python scripts/bench_reference.py          # converts the file if missing
    python scripts/bench_reference.py --model out/model.bin --no-baseline

Two weight strategies run on the same file in the same run, each in its own process (so each
peak RSS is its own): `integer`, the runtime as shipped (int8 used where it lies in the mapped
file, harness/tiled.py), and `dequantized`, the approach it replaced (every matrix dequantized to float32 at load,
`x @ W.T`). Per strategy, generating greedily as `lora-run` does (harness.generate): load seconds, prompt
tokens/s (the prompt's forward pass and first token), generation tokens/s (median time between
tokens) and peak RSS; for `integer`, where one generated token's time goes (the quantized
products, and the stored weight bytes they read per second, against everything else); then the
ratios, and ours against llama.cpp Q8_0 on the same shape, measured in
the same run by scripts/llama_bench.py (built from source once, into WORKDIR/llama.cpp) with the same
prompt length, generated tokens and threads, or, where it cannot be built or run, against its recorded
figures (`ANCHORS`) with the reason. With a LoRA file (converted with the model when the script makes it),
the integer run also adds it 4 times under 4 names (`lora-run --lora a=... --lora b=...`) and reports
the memory each extra adapter takes and what switching adapters between requests costs: the same
short request with each adapter in turn, against the base model's.
Random-weight models generate garbage text; only speed is measured. Timings on a shared
machine are noisy: medians of per-token times, single runs of load and prompt.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import ROOT, ensure_checkpoint  # noqa: E402

sys.path.insert(0, str(ROOT))

WORKDIR = Path(tempfile.gettempdir()) / "lora-convert-bench"  # shared with bench_convert.py's checkpoint
STRATEGIES = ("integer", "dequantized")
ADAPTERS = 4
REQUEST, REQUEST_TOKENS = "The quick brown fox", 6  # the adapters' requests: prompt, tokens generated at most
# llama.cpp Q8_0 on the GEMMA_2B shape, 2 threads (`llama-bench` pp512/tg128, load from page cache), recorded
# on another machine: the fallback when scripts/llama_bench.py cannot build or run llama.cpp here.
ANCHORS = {"load_s": 0.4, "prompt_tok_s": 47.5, "generate_tok_s": 6.3, "peak_rss": 2.7e9}


def rss_bytes(field: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident set, file-backed mapped pages included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt_of(loaded, tokens: int) -> str:
    """A prompt the runtime feeds as at least `tokens` tokens (start token included; a few more when the
    last word splits): random whole-word pieces, added one at a time and counted as re-encoded, since a
    random id's text can re-encode as many tokens (byte and unused pieces in a padded vocabulary)."""
    from harness.generate import prompt_ids

    vocab = loaded.tokenizer
    words = [vocab.id_to_piece(i) for i in range(vocab.get_piece_size())]
    words = [w for w in words if w.startswith("\u2581") and w[1:].isalpha() and w[1:].isascii()]
    if not words:
        raise SystemExit("the model's tokenizer has no whole-word pieces to build a prompt from")
    rng = random.Random(0)
    text = ""
    while len(prompt_ids(loaded, text)) < tokens:
        text = f"{text} {rng.choice(words)[1:]}".lstrip()
    return text


def measure(model_path: Path, strategy: str, prompt_tokens: int, generate_tokens: int, lora: Path | None) -> dict:
    """Load `model_path` with one strategy and generate greedily as `lora-run` does; seconds, peak RSS;
    then, given a `lora`, the adapters' memory and switching cost (`adapters`)."""

    from harness import reference
    from harness.generate import Options, generate_ids, prompt_ids
    from harness.linear import FloatLinear
    from harness.runtime import ReferenceRuntime

    if strategy == "dequantized":
        reference.load_linear = lambda weights, name, out_features, in_features: FloatLinear(
            weights.matrix(name, out_features, in_features))
    start = time.perf_counter()
    runtime = ReferenceRuntime(model_path)
    loaded = runtime.loaded
    load_seconds = time.perf_counter() - start
    prompt = prompt_of(loaded, prompt_tokens)
    count = len(prompt_ids(loaded, prompt))
    times = [time.perf_counter()]
    for _ in generate_ids(loaded, prompt, Options(max_tokens=count + generate_tokens, top_k=1, temperature=0)):
        times.append(time.perf_counter())
    steps = [b - a for a, b in zip(times[1:], times[2:])]
    result: dict = {"load_s": load_seconds, "prompt_tokens": count, "prompt_tok_s": count / (times[1] - times[0]),
                    "generated": len(times) - 1, "generate_tok_s": 1 / statistics.median(steps),
                    "step_ms": 1000 * statistics.median(steps), "peak_rss": rss_bytes()}
    if strategy == "integer":
        result["split"] = time_split(loaded.model, prompt_ids(loaded, prompt))
    if lora is not None and strategy == "integer":
        result["adapters"] = measure_adapters(runtime, lora, REQUEST)
    return result


def time_split(model, ids: list[int], tokens: int = 5) -> dict:
    """Median over `tokens` generated tokens: seconds per token, seconds in the quantized products, and
    the stored weight bytes those products read (each matrix once per token)."""
    import torch

    from harness.tiled import TiledLinear

    call, spent, read = TiledLinear.__call__, [0.0], [0]

    def timed(self, x):
        start = time.perf_counter()
        try:
            return call(self, x)
        finally:
            spent[0] += time.perf_counter() - start
            read[0] += self.data.nbytes

    totals, products = [], []
    TiledLinear.__call__ = timed  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            _, cache = model.forward(ids, last_only=True)
            for _ in range(tokens):
                spent[0], read[0], start = 0.0, 0, time.perf_counter()
                _, cache = model.forward([ids[-1]], cache)
                totals.append(time.perf_counter() - start)
                products.append(spent[0])
    finally:
        TiledLinear.__call__ = call  # type: ignore[method-assign]
    return {"token_s": statistics.median(totals), "products_s": statistics.median(products), "bytes": read[0]}


def measure_adapters(runtime, lora: Path, prompt: str) -> dict:
    """Add `lora` ADAPTERS times under new names (seconds and resident memory each), then run one short
    request per adapter, cycling base, a0, a1, ... twice: each request switches adapter; its time is
    compared with the base model's requests (median of each)."""
    added, grown = [], []
    for index in range(ADAPTERS):
        before, start = rss_bytes("VmRSS"), time.perf_counter()
        runtime.add_adapter(f"a{index}", lora)
        added.append(time.perf_counter() - start)
        grown.append(rss_bytes("VmRSS") - before)
    from harness.generate import Options

    options = Options(max_tokens=runtime.prompt_tokens(prompt) + REQUEST_TOKENS, top_k=1, temperature=0)
    seconds: dict[str, list[float]] = {name: [] for name in ["base", *runtime.adapters]}
    for _ in range(2):
        for name in seconds:
            start = time.perf_counter()
            runtime.generate(prompt, options, name)
            seconds[name].append(time.perf_counter() - start)
    with_adapter = [statistics.median(seconds[name]) for name in runtime.adapters]
    return {"add_s": statistics.median(added), "rss_per_adapter": statistics.median(grown),
            "request_s_base": statistics.median(seconds["base"]), "request_s_adapter": statistics.median(with_adapter),
            "request_tokens": options.max_tokens, "file_bytes": lora.stat().st_size}


def in_child(model_path: Path, strategy: str, prompt_tokens: int, generate_tokens: int, lora: Path | None) -> dict:
    command = [sys.executable, __file__, "--child", strategy, "--model", str(model_path),
               "--prompt-tokens", str(prompt_tokens), "--generate-tokens", str(generate_tokens)]
    if lora is not None:
        command += ["--lora", str(lora)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{strategy} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def ensure_model(model_path: Path, lora_path: Path, workdir: Path) -> None:
    """The GEMMA_2B-shaped int8 file and its rank-8 LoRA file, converted from scripts/make_checkpoint.py's
    checkpoint and adapter if missing."""
    if model_path.is_file() and lora_path.is_file():
        return
    checkpoint, adapter, tokenizer = ensure_checkpoint("GEMMA_2B", workdir / "gemma_2b", lora_rank=8)
    click.echo(f"converting {checkpoint} -> {model_path} (int8) and {lora_path}", err=True)
    subprocess.run([sys.executable, "-m", "converter.cli", "--model-type", "GEMMA_2B", "--input-ckpt", str(checkpoint),
                    "--vocab-model-file", str(tokenizer), "--lora-ckpt", str(adapter), "--quantization", "int8",
                    "--output-dir", str(model_path.parent), "--output-tflite-file", str(model_path),
                    "--lora-output-tflite-file", str(lora_path), "--quiet"], cwd=ROOT, check=True)


def tiny_model(folder: Path) -> Path:
    from converter import ConversionConfig, convert

    fixture = ROOT / "fixtures" / "tiny-gemma"
    return convert(ConversionConfig(input_ckpt=fixture, ckpt_format="safetensors", model_type="GEMMA_2B",
                                    output_dir=folder, vocab_model_file=fixture / "tokenizer.model",
                                    quantization="int8")).output


def llama_cpp_figures(workdir: Path, threads: int, prompt_tokens: int, generate_tokens: int) -> tuple[str, dict]:
    """llama.cpp Q8_0 on the GEMMA_2B-shaped checkpoint, measured now (see scripts/llama_bench.py), or, with
    the reason, its recorded figures."""
    import llama_bench

    checkpoint, _, _ = ensure_checkpoint("GEMMA_2B", workdir / "gemma_2b", lora_rank=8)
    cache, model = workdir / "llama.cpp", checkpoint.with_name(f"{checkpoint.name}-q8_0.gguf")
    try:
        click.echo(f"llama.cpp: llama-bench in {cache} on {model} (built and converted on first use)", err=True)
        binary, _ = llama_bench.llama_bench(cache)
        llama_bench.gguf(checkpoint, model, cache)
        figures = llama_bench.measure(model, binary, threads, prompt_tokens, generate_tokens)
    except llama_bench.Unavailable as exc:
        return f"recorded pp512/tg128, not this run: {exc}", ANCHORS
    return f"this run, llama-bench pp{figures.prompt_tokens}/tg{figures.generated}", asdict(figures)


def ratios(ours: dict, other: dict) -> str:
    """Our figures over another run's: load time, prompt and generation speed, peak RSS."""
    return (f"load time {ours['load_s'] / other['load_s']:.2f}x, prompt speed {ours['prompt_tok_s'] / other['prompt_tok_s']:.2f}x, "
            f"generation speed {ours['generate_tok_s'] / other['generate_tok_s']:.2f}x, "
            f"peak RSS {ours['peak_rss'] / other['peak_rss']:.2f}x")


def report(title: str, results: dict[str, dict], llama: tuple[str, dict] | None = None) -> None:
    click.echo(title)
    for strategy, r in results.items():
        click.echo(f"  {strategy:12} load {r['load_s']:6.2f} s   prompt ({r['prompt_tokens']}) {r['prompt_tok_s']:8.1f} tok/s   "
                   f"generation ({r['generated']}) {r['generate_tok_s']:8.2f} tok/s ({r['step_ms']:.2f} ms/token)   "
                   f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB ({r['peak_rss'] / 1e9:.2f} GB)")
    ours = results["integer"]
    if "split" in ours:
        split = ours["split"]
        click.echo(f"  where a generated token's {split['token_s'] * 1e3:.0f} ms go: quantized products "
                   f"{split['products_s'] * 1e3:.0f} ms ({split['bytes'] / 1e9:.2f} GB of stored weights, "
                   f"{split['bytes'] / split['products_s'] / 1e9:.1f} GB/s), the rest "
                   f"{(split['token_s'] - split['products_s']) * 1e3:.0f} ms")
    if llama:
        label, anchor = llama
        click.echo(f"  llama.cpp Q8_0 ({label}): load {anchor['load_s']:.2f} s, prompt "
                   f"{anchor['prompt_tok_s']:.1f} tok/s, generation {anchor['generate_tok_s']:.2f} tok/s, peak RSS "
                   f"{anchor['peak_rss'] / 1e9:.2f} GB; ours / llama.cpp: {ratios(ours, anchor)}")
    if "adapters" in ours:
        a = ours["adapters"]
        click.echo(f"  {ADAPTERS} adapters ({a['file_bytes'] / 2**20:.1f} MiB file each): {a['add_s'] * 1000:.0f} ms and "
                   f"{a['rss_per_adapter'] / 2**20:.1f} MiB resident per extra adapter, no base reload; a "
                   f"{a['request_tokens']}-token (KV cache) request switching adapter {a['request_s_adapter']:.2f} s vs "
                   f"{a['request_s_base']:.2f} s on the base alone ({a['request_s_adapter'] / a['request_s_base']:.2f}x)")
    if len(results) == 2:
        click.echo(f"  integer / dequantized: {ratios(ours, results['dequantized'])}")


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=WORKDIR, show_default=True,
              help="Where the GEMMA_2B-shaped checkpoint and its int8 file are made (when --model is not given).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="GEMMA_2B-shaped int8 .bin [default: WORKDIR/gemma-2b-int8.bin, converted if missing].")
@click.option("--lora", "lora_path", type=click.Path(path_type=Path), default=None,
              help="LoRA .bin of --model, for the adapters' figures [default: WORKDIR/gemma-2b-lora8.bin, converted "
                   "with the model when it is missing; none with --model].")
@click.option("--prompt-tokens", default=106, show_default=True,
              help="Prompt length in tokens (the issue's llama.cpp comparison prompt: 106).")
@click.option("--generate-tokens", default=16, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also run the dequantize-to-float32 strategy (about 10 GiB for GEMMA_2B).")
@click.option("--big/--tiny-only", default=True, show_default=True, help="Also run the GEMMA_2B-shaped file.")
@click.option("--llama-cpp/--no-llama-cpp", default=True, show_default=True,
              help="Also measure llama.cpp Q8_0 on WORKDIR's GEMMA_2B-shaped checkpoint (made if missing), building "
                   "it and the GGUF once under WORKDIR; when it cannot, or with --no-llama-cpp: its recorded figures.")
@click.option("--child", type=click.Choice(STRATEGIES), default=None, hidden=True)
def main(workdir: Path, model_path: Path | None, lora_path: Path | None, prompt_tokens: int, generate_tokens: int,
         baseline: bool, big: bool, llama_cpp: bool, child: str | None) -> None:
    if child:
        assert model_path is not None  # in_child passes it
        click.echo(json.dumps(measure(model_path, child, prompt_tokens, generate_tokens, lora_path)))
        return
    click.echo(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    strategies = STRATEGIES if baseline else STRATEGIES[:1]
    with tempfile.TemporaryDirectory() as folder:
        tiny = tiny_model(Path(folder))
        report("tiny Gemma (2 layers, hidden 64, vocab 512), int8:",
               {s: in_child(tiny, s, prompt_tokens, 100, None) for s in strategies})
    if big:
        if model_path is None:
            model_path, lora_path = workdir / "gemma-2b-int8.bin", workdir / "gemma-2b-lora8.bin"
            ensure_model(model_path, lora_path, workdir)
        results = {s: in_child(model_path, s, prompt_tokens, generate_tokens, lora_path) for s in strategies}
        llama = (llama_cpp_figures(workdir, torch_threads(), prompt_tokens, generate_tokens) if llama_cpp
                 else ("recorded pp512/tg128, not this run: --no-llama-cpp", ANCHORS))
        report(f"GEMMA_2B shape, int8, {model_path.stat().st_size / 1e9:.2f} GB file, {torch_threads()} threads:",
               results, llama)
    click.echo(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
