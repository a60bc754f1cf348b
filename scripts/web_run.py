"""Generate with the real MediaPipe web runtime (tasks-genai in headless Chromium, WebGPU on
SwiftShader) from our files; the counterpart of `lora-run` for the GPU runtime.

    python scripts/web_run.py --model out/model.bin [--lora out/lora.bin --lora-rank 8] \
        --prompt "one two three" --max-tokens 16 --top-k 1
Needs Chromium (apt-get install chromium) and the npm package (bash scripts/setup_web.sh).
Prints the base text, or with --lora the base text and then the adapter's (one per line).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bundler.task import open_weights  # noqa: E402
from converter.errors import ConversionError  # noqa: E402
from converter.files import regular_file  # noqa: E402
from converter.runtime_options import DEFAULTS, RuntimeOptions  # noqa: E402
from converter.tflite import WeightFile  # noqa: E402
from harness.inputs import check_prompt  # noqa: E402
from harness.web_runtime import Timeouts, WebRuntime, WebRuntimeError, chromium_version  # noqa: E402

MAX_TIMEOUT = 86400  # seconds: a day per browser step is plenty, more is a typo


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Base weights .bin (a .task wrapping GPU weights is refused by the web runtime).")
@click.option("--lora", type=click.Path(path_type=Path), default=None, help="LoRA weights .bin.")
@click.option("--lora-rank", type=int, default=None, help="loraRanks for the runtime [default: the LoRA file's rank].")
@click.option("--prompt", required=True)
@click.option("--max-tokens", default=DEFAULTS.max_tokens, show_default=True, help="KV-cache size: prompt + output.")
@click.option("--top-k", default=DEFAULTS.top_k, show_default=True)
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True)
@click.option("--random-seed", default=DEFAULTS.random_seed, show_default=True)
@click.option("--timeout", default=120.0, show_default=True, help="Seconds allowed for each browser step.")
def main(model, lora, lora_rank, prompt, max_tokens, top_k, temperature, random_seed, timeout) -> None:
    try:
        options = RuntimeOptions(max_tokens, top_k, temperature, random_seed)
        ranks = checked_ranks(regular_file(model, "--model"), lora and regular_file(lora, "--lora"), lora_rank)
        check_prompt(prompt)
        if not 0 < timeout <= MAX_TIMEOUT:  # NaN fails too
            raise ConversionError(f"--timeout {timeout}: expected seconds > 0, at most {MAX_TIMEOUT}")
    except ConversionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    try:
        with WebRuntime(timeouts=Timeouts(launch=timeout, load=timeout, generate=timeout)) as web:
            click.echo(f"{chromium_version()}, WebGPU on SwiftShader", err=True)
            start = time.perf_counter()
            web.load_model(model, options, lora_ranks=ranks)
            click.echo(f"model loaded in {time.perf_counter() - start:.2f} s", err=True)
            start = time.perf_counter()
            click.echo(web.generate(prompt).strip())
            click.echo(f"base: {time.perf_counter() - start:.2f} s (the first generation compiles shaders)", err=True)
            if lora:
                handle = web.load_lora(lora)
                start = time.perf_counter()
                click.echo(web.generate(prompt, handle).strip())
                click.echo(f"LoRA: {time.perf_counter() - start:.2f} s", err=True)
    except WebRuntimeError as exc:
        click.echo(f"error: {str(exc).splitlines()[0]}", err=True)
        sys.exit(1)


def checked_ranks(model: Path, lora: Path | None, lora_rank: int | None) -> list[int] | None:
    """loraRanks for the runtime: --lora-rank, or the LoRA file's own rank; None without --lora.
    The files must be weights files (or a bundle) of the right kind."""
    if open_weights(model, "--model")[0].lora_rank is not None:
        raise ConversionError(f"--model {model} is a LoRA weights file: give it as --lora")
    if lora is None:
        if lora_rank is not None:
            raise ConversionError("--lora-rank goes with --lora")
        return None
    rank = WeightFile(lora).lora_rank
    if rank is None:
        raise ConversionError(f"--lora {lora}: a base model's weights file, not a LoRA weights file")
    if lora_rank is not None and lora_rank < rank:
        raise ConversionError(f"--lora-rank {lora_rank}: below the rank {rank} of {lora}")
    return [lora_rank or rank]

if __name__ == "__main__":
    main()
