"""Benchmark: the reference CPU runtime's speed and memory on a GEMMA_2B-shaped int8 file, and on
the tiny fixture model.

    flock /tmp/heavy.lock python scripts/bench_reference.py          # converts the file if missing
    python scripts/bench_reference.py --model out/model.bin --no-baseline

Two weight strategies run on the same file in the same run, each in its own process (so each
peak RSS is its own): `integer`, the runtime as shipped (int8 kept as integers, harness/linear.py),
and `dequantized`, the approach it replaced (every matrix dequantized to float32 at load,
`x @ W.T`). Per strategy, generating greedily as `lora-run` does (harness.generate): load seconds, prompt
tokens/s (the prompt's forward pass and first token), generation tokens/s (median time between
tokens) and peak RSS; then the ratios.
Random-weight models generate garbage text; only speed is measured. Timings on a shared
machine are noisy: medians of per-token times, single runs of load and prompt.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import ROOT, ensure_checkpoint  # noqa: E402

sys.path.insert(0, str(ROOT))

WORKDIR = Path(tempfile.gettempdir()) / "lora-convert-bench"  # shared with bench_convert.py's checkpoint
STRATEGIES = ("integer", "dequantized")


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), file-backed mapped pages included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(model_path: Path, strategy: str, prompt_tokens: int, generate_tokens: int) -> dict:
    """Load `model_path` with one strategy and generate greedily as `lora-run` does; seconds, peak RSS."""
    import torch

    from harness import reference
    from harness.generate import Options, generate_ids, load, prompt_ids
    from harness.linear import FloatLinear

    if strategy == "dequantized":
        reference.load_linear = lambda weights, name, rows, cols, lookup=False: FloatLinear(weights.matrix(name, rows, cols))
    start = time.perf_counter()
    loaded = load(model_path)
    load_seconds = time.perf_counter() - start
    random_ids = torch.randint(3, loaded.tokenizer.get_piece_size(), (prompt_tokens,),
                               generator=torch.Generator().manual_seed(0)).tolist()
    prompt = loaded.tokenizer.decode(random_ids)
    count = len(prompt_ids(loaded, prompt))
    times = [time.perf_counter()]
    for _ in generate_ids(loaded, prompt, Options(max_tokens=count + generate_tokens, top_k=1, temperature=0)):
        times.append(time.perf_counter())
    steps = [b - a for a, b in zip(times[1:], times[2:])]
    return {"load_s": load_seconds, "prompt_tokens": count, "prompt_tok_s": count / (times[1] - times[0]),
            "generated": len(times) - 1, "generate_tok_s": 1 / statistics.median(steps),
            "step_ms": 1000 * statistics.median(steps), "peak_rss": peak_rss_bytes()}


def in_child(model_path: Path, strategy: str, prompt_tokens: int, generate_tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", strategy, "--model", str(model_path),
               "--prompt-tokens", str(prompt_tokens), "--generate-tokens", str(generate_tokens)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{strategy} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def ensure_model(model_path: Path, workdir: Path) -> None:
    """The GEMMA_2B-shaped int8 file, converted from scripts/make_checkpoint.py's checkpoint if missing."""
    if model_path.is_file():
        return
    checkpoint, _, tokenizer = ensure_checkpoint("GEMMA_2B", workdir / "gemma_2b")
    click.echo(f"converting {checkpoint} -> {model_path} (int8)", err=True)
    subprocess.run([sys.executable, "-m", "converter.cli", "--model-type", "GEMMA_2B", "--input-ckpt", str(checkpoint),
                    "--vocab-model-file", str(tokenizer), "--quantization", "int8", "--output-dir",
                    str(model_path.parent), "--output-tflite-file", str(model_path), "--quiet"], cwd=ROOT, check=True)


def tiny_model(folder: Path) -> Path:
    from converter import ConversionConfig, convert

    fixture = ROOT / "fixtures" / "tiny-gemma"
    return convert(ConversionConfig(input_ckpt=fixture, ckpt_format="safetensors", model_type="GEMMA_2B",
                                    output_dir=folder, vocab_model_file=fixture / "tokenizer.model",
                                    quantization="int8")).output


def report(title: str, results: dict[str, dict]) -> None:
    click.echo(title)
    for strategy, r in results.items():
        click.echo(f"  {strategy:12} load {r['load_s']:6.2f} s   prompt ({r['prompt_tokens']}) {r['prompt_tok_s']:8.1f} tok/s   "
                   f"generation ({r['generated']}) {r['generate_tok_s']:8.2f} tok/s ({r['step_ms']:.2f} ms/token)   "
                   f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
    if len(results) == 2:
        ours, base = results["integer"], results["dequantized"]
        click.echo(f"  integer / dequantized: load time {ours['load_s'] / base['load_s']:.2f}x, prompt speed "
                   f"{ours['prompt_tok_s'] / base['prompt_tok_s']:.2f}x, generation speed "
                   f"{ours['generate_tok_s'] / base['generate_tok_s']:.2f}x, peak RSS "
                   f"{ours['peak_rss'] / base['peak_rss']:.2f}x")


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=WORKDIR, show_default=True,
              help="Where the GEMMA_2B-shaped checkpoint and its int8 file are made (when --model is not given).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="GEMMA_2B-shaped int8 .bin [default: WORKDIR/gemma-2b-int8.bin, converted if missing].")
@click.option("--prompt-tokens", default=64, show_default=True)
@click.option("--generate-tokens", default=16, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also run the dequantize-to-float32 strategy (about 10 GiB for GEMMA_2B).")
@click.option("--big/--tiny-only", default=True, show_default=True, help="Also run the GEMMA_2B-shaped file.")
@click.option("--child", type=click.Choice(STRATEGIES), default=None, hidden=True)
def main(workdir: Path, model_path: Path | None, prompt_tokens: int, generate_tokens: int, baseline: bool, big: bool,
         child: str | None) -> None:
    model_path = model_path or workdir / "gemma-2b-int8.bin"
    if child:
        click.echo(json.dumps(measure(model_path, child, prompt_tokens, generate_tokens)))
        return
    strategies = STRATEGIES if baseline else STRATEGIES[:1]
    with tempfile.TemporaryDirectory() as folder:
        tiny = tiny_model(Path(folder))
        report("tiny Gemma (2 layers, hidden 64, vocab 512), int8:",
               {s: in_child(tiny, s, prompt_tokens, 100) for s in strategies})
    if not big:
        return
    ensure_model(model_path, workdir)
    report(f"GEMMA_2B shape, int8, {model_path.stat().st_size / 1e9:.2f} GB file, {torch_threads()} threads:", {s: in_child(model_path, s, prompt_tokens, generate_tokens) for s in strategies})


if __name__ == "__main__":
    main()
