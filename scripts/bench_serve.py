"""Throughput and latency of `lora-run serve`: start it on a free loopback port, send N concurrent
TGI /generate requests spread over its adapters and the base, print requests/s and p50/p95 latency.

    python scripts/bench_serve.py [--requests 50] [--concurrency 8] [--model M --lora NAME=PATH ...]
Without --model it serves the trained fixtures (converted int8 into a temporary folder) with their
adapter under 3 names. Every answer must be the one its adapter gives alone (checked per name).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import httpx

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
PROMPTS = ("one two three", "two three four", "three four five")


def convert_fixtures(out: Path) -> tuple[Path, list[str]]:
    """The trained example converted as users do (int8): the base and its adapter under 3 names."""
    subprocess.run([sys.executable, "-m", "converter.cli", "--model-type", "GEMMA_2B",
                    "--input-ckpt", FIXTURES / "trained-gemma", "--vocab-model-file",
                    FIXTURES / "trained-gemma" / "tokenizer.model", "--output-dir", out,
                    "--output-tflite-file", out / "base.bin", "--lora-ckpt", FIXTURES / "trained-gemma-lora",
                    "--lora-rank", "8", "--lora-output-tflite-file", out / "lora.bin", "--quiet"],
                   cwd=ROOT, check=True)
    return out / "base.bin", [f"{name}={out / 'lora.bin'}" for name in ("hello", "hi", "hey")]


def start(model: Path, loras: list[str], max_tokens: int) -> tuple[subprocess.Popen, str]:
    """`lora-run serve` on 127.0.0.1, any free port; its URL once it listens."""
    args = [sys.executable, "-m", "harness.cli", "serve", "--model", model, "--port", "0", "--host", "127.0.0.1",
            "--max-tokens", str(max_tokens), "--temperature", "0"]
    for lora in loras:
        args += ["--lora", lora]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    url = process.stdout.readline().strip()
    if not url:
        process.wait()
        raise click.ClickException("lora-run serve did not start (its error is above)")
    return process, url


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Base .bin or .task [default: the trained fixtures, converted].")
@click.option("--lora", "loras", multiple=True, metavar="NAME=PATH", help="Adapters to serve (with --model).")
@click.option("--requests", "count", default=50, show_default=True, type=click.IntRange(1, 2000))
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(2, 4096))
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Seconds for one request.")
def main(model, loras, count, concurrency, max_tokens, timeout) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        if model is None:
            model, loras = convert_fixtures(Path(folder))
        process, url = start(model, list(loras), max_tokens)
        try:
            names = httpx.get(f"{url}/info", timeout=timeout).json()["adapters"] + ["base"]
            jobs = [(names[i % len(names)], PROMPTS[i // len(names) % len(PROMPTS)]) for i in range(count)]

            def send(job: tuple[str, str]) -> tuple[float, str]:
                began = time.perf_counter()
                response = httpx.post(f"{url}/generate", timeout=timeout,
                                      json={"inputs": job[1], "parameters": {"adapter_id": job[0]}})
                response.raise_for_status()
                return time.perf_counter() - began, response.json()["generated_text"]

            send(jobs[0])  # warm up
            began = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(send, jobs))
            elapsed = time.perf_counter() - began
        finally:
            process.terminate()
            process.wait(30)
    answers: dict[tuple[str, str], set[str]] = {}
    for job, (_, text) in zip(jobs, results):
        answers.setdefault(job, set()).add(text)
    mixed = [job for job, texts in answers.items() if len(texts) > 1]
    latencies = sorted(seconds for seconds, _ in results)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    print(f"{count} requests over {len(names)} names ({', '.join(names)}), {concurrency} at a time: "
          f"{count / elapsed:.1f} requests/s, latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms")
    if mixed:
        raise click.ClickException(f"different answers for the same adapter and prompt: {mixed}")


if __name__ == "__main__":
    main()
