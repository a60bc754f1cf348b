"""Benchmark: our converter vs MediaPipe 0.10.21 on the same real-shape checkpoint, same run.

    python scripts/bench_convert.py                       # GEMMA_2B bf16 + rank-8 LoRA, int8
    python scripts/bench_convert.py --repeat 3 --quantization int4 --lora-rank 0
    python scripts/bench_convert.py --preset GEMMA_7B --repeat 1 --workdir /work/big/bench-7b  # 17 GB checkpoint

Both read the checkpoint from a warm page cache; outputs are deleted and `sync`ed before each
run so neither pays for the other's write-back. Prints wall time and peak RSS of each and the
ratios (MediaPipe / ours). MediaPipe is not run where it cannot finish on this machine (GEMMA_7B);
the script says so and why. Model types without LoRA support are benchmarked without an adapter.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import ROOT, Measured, ensure_checkpoint, gib, oracle_python, run_measured  # noqa: E402

sys.path.insert(0, str(ROOT))
from converter.models import find_model_type  # noqa: E402

# Model types MediaPipe 0.10.21 cannot convert on this 24 GB, 2-core machine, with the measured reason.
MEDIAPIPE_CANNOT_RUN = {
    "GEMMA_7B": "killed for memory after 381 s at 22.9 GiB peak RSS on this 24 GB machine "
                "(shared/reference/anchors.md); running it again would starve every other process",
}
RSS_TARGET = 2**30  # the streaming converter's peak-RSS budget


def warm(folder: Path) -> None:
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


def fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["sync"], check=False)


def measure(command: list[str], out: Path, repeat: int) -> list[Measured]:
    runs = []
    for _ in range(repeat):
        fresh(out)
        run = run_measured(command, cwd=ROOT)
        if run.returncode:
            raise SystemExit(f"failed ({run.returncode}): {' '.join(command)}")
        runs.append(run)
    fresh(out)
    return runs


def summary(label: str, runs: list[Measured]) -> tuple[float, int]:
    seconds = statistics.median(r.seconds for r in runs)
    peak = max(r.peak_rss_bytes for r in runs)
    times = ", ".join(f"{r.seconds:.1f}" for r in runs)
    click.echo(f"{label:18} wall {seconds:7.1f} s (runs: {times})   peak RSS {gib(peak)}")
    return seconds, peak


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(tempfile.gettempdir()) / "lora-convert-bench", show_default=True)
@click.option("--preset", default="GEMMA_2B", show_default=True)
@click.option("--quantization", type=click.Choice(["int8", "int4"]), default="int8", show_default=True)
@click.option("--lora-rank", default=8, show_default=True, help="0: base only.")
@click.option("--repeat", default=3, show_default=True, help="Runs of ours (median reported).")
@click.option("--mediapipe-repeat", default=1, show_default=True, help="Runs of MediaPipe (0 to skip).")
def main(workdir: Path, preset: str, quantization: str, lora_rank: int, repeat: int, mediapipe_repeat: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    _, model_type = find_model_type(preset)
    if lora_rank and not model_type.lora:
        click.echo(f"{preset} takes no LoRA (MediaPipe refuses it): benchmarking the base conversion only")
        lora_rank = 0
    checkpoint, adapter, tokenizer = ensure_checkpoint(preset, workdir / preset.lower(), lora_rank or None)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    click.echo(f"{preset} checkpoint: {size / 1e9:.2f} GB bf16; {quantization}; "
               f"LoRA rank {lora_rank or 'none'}; 2 cores")
    ours_out, theirs_out = workdir / "ours", workdir / "mediapipe"
    ours = [sys.executable, "-m", "converter.cli", "--model-type", preset, "--input-ckpt", str(checkpoint),
            "--vocab-model-file", str(tokenizer), "--quantization", quantization, "--output-dir", str(ours_out),
            "--output-tflite-file", str(ours_out / "model.bin"), "--quiet"]
    theirs = [oracle_python(), str(ROOT / "scripts" / "oracle_convert.py"), "--model-type", preset,
              "--input-ckpt", str(checkpoint), "--vocab-model-file", str(tokenizer),
              "--bits", quantization.removeprefix("int"), "--output-dir", str(theirs_out / "bins"),
              "--output-tflite-file", str(theirs_out / "model.bin")]
    if adapter:
        ours += ["--lora-ckpt", str(adapter), "--lora-rank", str(lora_rank),
                 "--lora-output-tflite-file", str(ours_out / "lora.bin")]
        theirs += ["--lora-ckpt", str(adapter), "--lora-rank", str(lora_rank),
                   "--lora-output-tflite-file", str(theirs_out / "lora.bin")]
    warm(checkpoint)
    our_time, our_peak = summary("ours", measure(ours, ours_out, repeat))
    click.echo(f"ours peak RSS under {gib(RSS_TARGET)}: {'yes' if our_peak < RSS_TARGET else 'NO'}")
    if mediapipe_repeat and preset in MEDIAPIPE_CANNOT_RUN:
        click.echo(f"MediaPipe 0.10.21: not run for {preset}: {MEDIAPIPE_CANNOT_RUN[preset]}")
    elif mediapipe_repeat:
        warm(checkpoint)
        mp_time, mp_peak = summary("MediaPipe 0.10.21", measure(theirs, theirs_out, mediapipe_repeat))
        click.echo(f"ratios (MediaPipe / ours): wall {mp_time / our_time:.1f}x, peak RSS {mp_peak / our_peak:.1f}x")


if __name__ == "__main__":
    main()
