"""Benchmark: one quantized matrix product of the reference runtime (`harness.tiled`: on the stored
tile4 bytes, nothing done at load), per GEMMA_2B matrix shape, against float32 `x @ W.T` on the
same weights dequantized (4x the memory: the float32 arithmetic floor), same run, best of several;
prints the ratios. (Against the oneDNN int8-digit products this replaced, on 2 shared cores: one
row 2.1-3.6x faster, 106 rows 0.9-1.6x.)

    flock /tmp/heavy.lock python scripts/bench_linear.py [--bits 8] [--rows 1 --rows 106]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from converter import quantize  # noqa: E402
from harness.tiled import TiledLinear  # noqa: E402

SHAPES = {"q/o": (2048, 2048), "k/v": (256, 2048), "gate/up": (16384, 2048), "down": (2048, 16384),
          "logits": (256000, 2048)}


def best(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


@click.command()
@click.option("--bits", type=click.Choice(["8", "4"]), default="8", show_default=True)
@click.option("--rows", "row_counts", multiple=True, type=int, default=(1, 106), show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--shape", "shapes", multiple=True, type=click.Choice(list(SHAPES)), default=list(SHAPES))
def main(bits: str, row_counts: tuple[int, ...], repeats: int, shapes: tuple[str, ...]) -> None:
    width = int(bits)
    click.echo(f"{torch.get_num_threads()} threads, int{width}, load average {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)
    for name in shapes:
        out_features, in_features = SHAPES[name]
        data = rng.integers(0, 256, out_features * in_features * width // 8, dtype=np.uint8)
        scale = torch.rand(out_features) / 100
        tiled = TiledLinear(data, scale, width, out_features, in_features)
        start = time.perf_counter()
        dequantized = quantize.dequantize_tiled(torch.from_numpy(data), scale, width, out_features, in_features)
        load = time.perf_counter() - start
        for rows in row_counts:
            x = torch.randn(rows, in_features)
            tiled(x)  # compile, warm caches
            ours = best(lambda: tiled(x), repeats)  # noqa: B023 (called at once)
            floor = best(lambda: x @ dequantized.T, repeats)  # noqa: B023
            click.echo(f"  {name:8} [{out_features}, {in_features}] rows {rows:4}: tiled {ours * 1e3:8.2f} ms "
                       f"({rows * out_features * in_features / ours / 1e9:6.2f} G mac/s), float32 sgemm "
                       f"{floor * 1e3:8.2f} ms (+ {load:.2f} s to dequantize): tiled speed {floor / ours:.2f}x")
    click.echo(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
