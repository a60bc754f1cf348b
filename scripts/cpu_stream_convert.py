"""Our CPU conversion of a Gemma 1 checkpoint at any size: the litert-torch graph is built once per
shape from placeholder weights (cached), then the int8 weights are streamed into a copy of it.

    python scripts/cpu_stream_convert.py --checkpoint /work/big/gemma_2b --out /tmp/model.tflite

Prints each stage's time and this process's peak RSS so far. The graph cache is keyed by the
checkpoint's config.json, the export settings and the litert-torch version; beside each graph, its
matrices in marker order.
"""
from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from converter import cpu_gemma, cpu_stream  # noqa: E402
from converter.checkpoint import open_checkpoint  # noqa: E402

CACHE = Path.home() / ".cache" / "lora-convert" / "cpu-graphs"


def stage(label: str, start: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    click.echo(f"ours {label}: {time.perf_counter() - start:.1f} s, peak RSS {peak:.2f} GiB", err=True)


def graph_key(config: dict, prefill: int, kv_cache: int, lora_rank: int) -> str:
    from importlib.metadata import version

    settings = {"config": config, "prefill": prefill, "kv": kv_cache, "lora": lora_rank,
                "litert-torch": version("litert-torch")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@click.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model file to write.")
@click.option("--prefill", default=128, show_default=True)
@click.option("--kv-cache", default=1280, show_default=True)
@click.option("--lora-rank", default=0, show_default=True, help="Also LoRA signatures of this rank (0: none).")
@click.option("--cache", type=click.Path(path_type=Path), default=CACHE, show_default=True)
@click.option("--no-cache", is_flag=True, help="Build the graph even when a cached one exists.")
def main(checkpoint: Path, out: Path, prefill: int, kv_cache: int, lora_rank: int, cache: Path, no_cache: bool) -> None:
    start = time.perf_counter()
    config = json.loads((checkpoint / "config.json").read_text())
    source = open_checkpoint(checkpoint, "safetensors")
    key = cache / graph_key(config, prefill, kv_cache, lora_rank)
    template, order_file = key.with_suffix(".tflite"), key.with_suffix(".json")
    if no_cache or not (template.is_file() and order_file.is_file()):
        model, order = cpu_gemma.build_model(config, source, placeholders=True)
        stage("placeholder model", start)
        cpu_gemma.export(model, config, cache / "build", prefill, kv_cache, lora_rank).replace(template)
        order_file.write_text(json.dumps(order))
        stage(f"graph built ({template.stat().st_size / 2**30:.2f} GiB)", start)
    else:  # litert-torch is not even imported
        order = json.loads(order_file.read_text())
        stage(f"graph from cache ({template})", start)
    matrices, _ = cpu_gemma.graph_names(config["num_hidden_layers"])
    cpu_stream.stream_weights(template, out, source, [matrices[name] for name in order], order)
    stage(f"weights streamed into {out} ({out.stat().st_size / 2**30:.2f} GiB)", start)


if __name__ == "__main__":
    main()
