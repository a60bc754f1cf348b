"""Anchor for bench_convert.py's CPU case: litert-torch's own conversion of a Gemma 1 checkpoint.

Runs what litert-torch's gemma example (`convert_gemma1_to_tflite.py`) runs, through its
documented API: `gemma1.build_2b_model` loads the whole checkpoint into a float32 torch model,
then `converter.convert_to_tflite` exports the prefill/decode signatures and quantizes. Settings
are the ones LiteRT-LM's CPU executor takes (attention mask as input, transposed KV cache).
Prints one line per stage with its time and this process's peak RSS so far, so a run killed for
time or memory still says how far it got.

    python scripts/litert_torch_convert.py --checkpoint /work/big/gemma_2b --out /tmp/lt
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from converter.cpu.litert import litert_torch  # noqa: E402  (imports it without TensorFlow)


def stage(label: str, start: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    click.echo(f"litert-torch {label}: {time.perf_counter() - start:.1f} s, peak RSS {peak:.2f} GiB", err=True)


@click.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--prefill", default=128, show_default=True, help="Prefill signature length.")
@click.option("--kv-cache", default=1280, show_default=True, help="KV cache length.")
@click.option("--quantize", default="dynamic_int8", show_default=True)
@click.option("--lora-rank", default=0, show_default=True, help="Also export LoRA signatures of this rank (0: none).")
def main(checkpoint: Path, out: Path, prefill: int, kv_cache: int, quantize: str, lora_rank: int) -> None:
    start = time.perf_counter()
    litert_torch()
    from litert_torch import _config

    _config.config.show_progress = True  # its stage lines say how far a stopped run got
    from litert_torch.generative.examples.gemma import gemma1
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.utilities import converter, export_config

    stage("import", start)
    model = gemma1.build_2b_model(str(checkpoint), mask_cache_size=0)
    stage("model built (weights loaded)", start)
    out.mkdir(parents=True, exist_ok=True)
    config = export_config.ExportConfig(mask_as_input=True, kvcache_layout=kv_utils.KV_LAYOUT_TRANSPOSED)
    path = converter.convert_to_tflite(
        model, output_path=str(out), output_name_prefix="gemma", prefill_seq_len=[prefill],
        kv_cache_max_len=kv_cache, quantize=quantize, lora_ranks=[lora_rank] if lora_rank else None,
        export_config=config,
    )
    stage(f"exported {path} ({Path(path).stat().st_size / 2**30:.2f} GiB)", start)


if __name__ == "__main__":
    main()
