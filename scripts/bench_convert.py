"""Benchmark: our converter vs MediaPipe 0.10.21 on the same real-shape checkpoint, same run.

    python scripts/bench_convert.py                       # GEMMA_2B bf16 + rank-8 LoRA, int8, 3 runs each
    python scripts/bench_convert.py --quantization int4 --lora-rank 0
    python scripts/bench_convert.py --preset GEMMA_7B --workdir /work/big/bench-7b --versus GEMMA_2B  # 17 GB
    python scripts/bench_convert.py --backend cpu         # GEMMA_2B int8 CPU graph vs litert-torch's export

Both read the checkpoint from a warm page cache and take turns (ours, MediaPipe, ours, ...), so
both see the same load from other jobs; outputs are deleted and `sync`ed before each run so
neither pays for the other's write-back. Prints wall time (median) and peak RSS of each,
the ratios (MediaPipe / ours), and the machine's floor measured in the same run: reading the
checkpoint from page cache, quantizing every matrix in one thread (compiled kernel, no writes),
and writing (and syncing) as many bytes as our output. MediaPipe is not run where it cannot
finish on this machine (GEMMA_7B); the script says so and why. Model types without LoRA support
are benchmarked without an adapter.
"""
from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import ROOT, Measured, ensure_checkpoint, gib, oracle_python, run_measured  # noqa: E402

sys.path.insert(0, str(ROOT))
from converter import files, quantize  # noqa: E402
from converter.checkpoint import SafetensorsSource  # noqa: E402
from converter.convert import rows_per_chunk  # noqa: E402
from converter.models import find_model_type  # noqa: E402

# Model types MediaPipe 0.10.21 cannot convert on this 24 GB, 2-core machine, with the measured reason.
MEDIAPIPE_CANNOT_RUN = {
    "GEMMA_7B": "killed for memory after 381 s at 22.9 GiB peak RSS on this 24 GB machine "
                "(shared/reference/anchors.md); running it again would starve every other process",
}
RSS_TARGET = 2**30  # the streaming converter's peak-RSS budget
CPU_RSS_TARGET, CPU_TIME_TARGET = 4 * 2**30, 120.0  # the CPU path's budget (graph from cache)
RSS_LIMIT = 18 * 2**30  # a CPU conversion is stopped here, before it starves the machine


def warm(folder: Path) -> float:
    """Read the checkpoint (into page cache); the seconds it took."""
    start = time.perf_counter()
    buffer = bytearray(1 << 24)
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def quantize_floor(folder: Path, bits: int) -> float:
    """Seconds to quantize every matrix of the checkpoint, read from page cache, in one thread."""
    source = SafetensorsSource(sorted(folder.glob("*.safetensors")))
    start = time.perf_counter()
    for name in source.names():
        shape = source.info(name).shape
        if len(shape) != 2 or shape[0] % 4 or shape[1] % 4:
            continue
        rows, cols = shape
        step = rows_per_chunk(cols)
        tiled = quantize.torch.empty(cols // 4, step * bits // 2, dtype=quantize.torch.uint8)
        scales, sums = quantize.torch.empty(step), quantize.torch.empty(step, dtype=quantize.torch.int32)
        for begin in range(0, rows, step):
            stop = min(begin + step, rows)
            with source.rows(name, begin, stop) as chunk:
                count = stop - begin
                quantize.quantize_rows(chunk, bits, tiled[:, :count * bits // 2], scales[:count], sums[:count])
    source.close()
    return time.perf_counter() - start


def write_floor(folder: Path, nbytes: int) -> float:
    """Seconds to write and fsync `nbytes` in 16 MiB pwrites, each block's writeback started once
    written, as the converter writes its output (one thread, no computing)."""
    path = folder / "write-floor.tmp"
    block = bytes(16 << 20)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, nbytes, len(block)):
            os.pwrite(fd, block[: nbytes - offset], offset)
            files.start_writeback(fd, offset, len(block))
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    subprocess.run(["sync"], check=False)
    return seconds


def fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["sync"], check=False)


def run_once(command: list[str], out: Path) -> Measured:
    fresh(out)
    run = run_measured(command, cwd=ROOT)
    if run.returncode:
        raise SystemExit(f"failed ({run.returncode}): {' '.join(command)}")
    return run


def output_bytes(out: Path) -> int:
    size = sum(f.stat().st_size for f in out.rglob("*.bin"))
    fresh(out)
    return size


def measure(command: list[str], out: Path, repeat: int) -> tuple[list[Measured], int]:
    """The runs, and the bytes of the output files."""
    runs = [run_once(command, out) for _ in range(repeat)]
    return runs, output_bytes(out)


def measure_in_turns(ours: list[str], our_out: Path, repeat: int, theirs: list[str], their_out: Path,
                     their_repeat: int, checkpoint: Path) -> tuple[list[Measured], int, list[Measured]]:
    """Our runs and theirs taking turns (ours, theirs, ours, ...), so that both see the same load
    from whatever else runs on the machine, each after reading the checkpoint into page cache again
    (MediaPipe's 9 GiB can push part of it out); and the bytes of our output."""
    our_runs: list[Measured] = []
    their_runs: list[Measured] = []
    for turn in range(max(repeat, their_repeat)):
        if turn < repeat:
            warm(checkpoint)
            our_runs.append(run_once(ours, our_out))
        if turn < their_repeat:
            warm(checkpoint)
            their_runs.append(run_once(theirs, their_out))
    fresh(their_out)
    return our_runs, output_bytes(our_out), their_runs


def summary(label: str, runs: list[Measured]) -> tuple[float, int]:
    seconds = statistics.median(r.seconds for r in runs)
    peak = max(r.peak_rss_bytes for r in runs)
    times = ", ".join(f"{r.seconds:.1f}" for r in runs)
    click.echo(f"{label:18} wall {seconds:7.1f} s (runs: {times})   peak RSS {gib(peak)}")
    return seconds, peak


def group_rss(group: int) -> int:
    """Resident bytes of a process group, all processes together (lora-convert's work runs in a child)."""
    listed = subprocess.run(["ps", "-o", "rss=", "-g", str(group)], capture_output=True, text=True).stdout
    return sum(int(kb) for kb in listed.split()) * 1024


def run_limited(command: list[str], rss_limit: int, timeout: float) -> tuple[Measured, str]:
    """Run a command (its stage lines shown) and stop it past `rss_limit` bytes of RSS (its whole
    process group) or `timeout` s. The peak is the larger of the polled group total and wait4's."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    peak, stopped = 0, ""
    while process.poll() is None:
        rss = group_rss(process.pid)
        peak = max(peak, rss)
        elapsed = time.perf_counter() - start
        if rss > rss_limit or elapsed > timeout:
            stopped = f"stopped at {gib(rss)} RSS" if rss > rss_limit else f"stopped after {timeout:.0f} s"
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    try:
        _, status, usage = os.wait4(process.pid, 0)
        code, peak = os.waitstatus_to_exitcode(status), max(peak, usage.ru_maxrss * 1024)
    except ChildProcessError:  # reaped by poll()
        code = process.returncode
    return Measured(time.perf_counter() - start, peak, code or 0), stopped


def cpu_case(workdir: Path, preset: str, lora_rank: int, anchor: bool) -> None:
    """Ours (`lora-convert --backend cpu`: graph template built, then from the cache; weights
    streamed) vs litert-torch's documented export of the same checkpoint."""
    checkpoint, adapter, tokenizer = ensure_checkpoint(preset, workdir / preset.lower(), lora_rank or None)
    cache, out = workdir / "xdg-cache", workdir / "cpu-ours"
    os.environ["XDG_CACHE_HOME"] = str(cache)  # the runs' own graph cache, emptied first
    shutil.rmtree(cache, ignore_errors=True)
    ours = [sys.executable, "-m", "converter.cli", "--backend", "cpu", "--model-type", preset, "--input-ckpt",
            str(checkpoint), "--vocab-model-file", str(tokenizer), "--output-dir", str(out),
            "--kv-cache-size", "1280", "--prefill-length", "128", "--quiet"]
    theirs = [sys.executable, str(ROOT / "scripts" / "litert_torch_convert.py"), "--checkpoint", str(checkpoint),
              "--out", str(workdir / "cpu-litert-torch")]
    if adapter:  # LoRA signatures in both graphs; LiteRT-LM takes LoRA ranks 16 or 32
        ours += ["--lora-ckpt", str(adapter)]
        theirs += ["--lora-rank", str(max(16, lora_rank))]
    click.echo(f"{preset} CPU int8 (prefill 128, KV cache 1280); load: {os.getloadavg()[0]:.2f}")
    warm(checkpoint)
    results = {}
    for label, command in (("ours, graph built", ours), ("ours, graph cached", ours)):
        fresh(out)
        run, stopped = run_limited(command, RSS_LIMIT, 900)
        if stopped or run.returncode:  # GEMMA_2B: litert-torch's float flatbuffer + quantizer step
            raise SystemExit(f"{label}: {stopped or f'failed ({run.returncode})'} after {run.seconds:.1f} s")
        results[label] = summary(label, [run])
    fresh(out)
    seconds, peak = results["ours, graph cached"]
    click.echo(f"ours (cached graph) under {gib(CPU_RSS_TARGET)} and {CPU_TIME_TARGET:.0f} s: "
               f"{'yes' if peak < CPU_RSS_TARGET and seconds < CPU_TIME_TARGET else 'NO'}")
    if not anchor:
        return
    warm(checkpoint)
    run, stopped = run_limited(theirs, RSS_LIMIT, 900)
    shutil.rmtree(workdir / "cpu-litert-torch", ignore_errors=True)
    label = "litert-torch 0.10"
    if stopped or run.returncode:
        click.echo(f"{label:18} {stopped or f'failed ({run.returncode})'} after {run.seconds:.1f} s, "
                   f"peak RSS {gib(run.peak_rss_bytes)} (its last stage line above says how far it got)")
    else:
        summary(label, [run])
    for name, (ours_seconds, ours_peak) in results.items():
        bound = "at least " if stopped or run.returncode else ""
        click.echo(f"ratios (litert-torch / {name}): wall {bound}{run.seconds / ours_seconds:.1f}x, "
                   f"peak RSS {bound}{run.peak_rss_bytes / ours_peak:.1f}x")


@click.command()
@click.option("--backend", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(tempfile.gettempdir()) / "lora-convert-bench", show_default=True)
@click.option("--preset", default="GEMMA_2B", show_default=True)
@click.option("--quantization", type=click.Choice(["int8", "int4"]), default="int8", show_default=True)
@click.option("--lora-rank", default=8, show_default=True, help="0: base only.")
@click.option("--repeat", default=3, show_default=True, help="Runs of ours (median reported).")
@click.option("--mediapipe-repeat", default=3, show_default=True, help="Runs of MediaPipe (median; 0 to skip).")
@click.option("--versus", help="Also convert this preset (ours only, same options) and print the time ratio.")
@click.option("--no-anchor", is_flag=True, help="CPU: skip litert-torch's own conversion (about 9 min, 18 GiB).")
def main(backend: str, workdir: Path, preset: str, quantization: str, lora_rank: int, repeat: int,
         mediapipe_repeat: int, versus: str | None, no_anchor: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if backend == "cpu":
        cpu_case(workdir, preset, lora_rank, not no_anchor)
        return
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
    click.echo(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runnable = bool(mediapipe_repeat) and preset not in MEDIAPIPE_CANNOT_RUN
    our_runs, written, their_runs = measure_in_turns(ours, ours_out, repeat, theirs, theirs_out,
                                                     mediapipe_repeat if runnable else 0, checkpoint)
    our_time, our_peak = summary("ours", our_runs)
    click.echo(f"ours peak RSS under {gib(RSS_TARGET)}: {'yes' if our_peak < RSS_TARGET else 'NO'}")
    if runnable:
        mp_time, mp_peak = summary("MediaPipe 0.10.21", their_runs)
        click.echo(f"ratios (MediaPipe / ours): wall {mp_time / our_time:.1f}x, peak RSS {mp_peak / our_peak:.1f}x")
    elif mediapipe_repeat:
        click.echo(f"MediaPipe 0.10.21: not run for {preset}: {MEDIAPIPE_CANNOT_RUN[preset]}")
    floors = {"read (page cache)": warm(checkpoint),
              "read+quantize, 1 thread": quantize_floor(checkpoint, int(quantization.removeprefix("int"))),
              f"write+fsync {written / 1e9:.2f} GB": write_floor(workdir, written)}
    for label, seconds in floors.items():
        click.echo(f"  floor: {label:24} {seconds:6.1f} s")
    if versus:
        other, _, other_tokenizer = ensure_checkpoint(versus, workdir / versus.lower())
        command = [*ours[:ours.index("--model-type") + 1], versus, "--input-ckpt", str(other), "--vocab-model-file",
                   str(other_tokenizer), *ours[ours.index("--quantization"):ours.index("--quiet") + 1]]
        warm(other)
        other_time, _ = summary(f"ours {versus}", measure(command, ours_out, repeat)[0])
        click.echo(f"ratio {preset} / {versus} (ours): wall {our_time / other_time:.2f}x")
    click.echo(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
