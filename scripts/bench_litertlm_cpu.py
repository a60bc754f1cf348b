"""Benchmark: our GEMMA_2B-shaped int8 CPU model in LiteRT-LM (CPU backend, XNNPACK) on 2 threads,
beside llama.cpp's figures for the same shape.

    flock /tmp/heavy.lock python scripts/bench_litertlm_cpu.py --model /work/big/model.tflite \\
        --tokenizer /work/big/gemma_2b/tokenizer.model

`--model` is a `.litertlm`, or a prefill/decode `.tflite` packed here with the tokenizer (start
token 2, stop token 1). Each run is LiteRT-LM's own benchmark (`litert_lm.Benchmark`: prompt tokens
prefilled, then tokens decoded) in its own process, so its peak RSS is its own. Prints prompt and
generation tokens/s (median of the runs), load seconds and peak RSS, then llama.cpp's recorded
figures (llama-bench, Q8_0, 2 threads; llama.cpp is not installed here) and the ratios.
Random-weight models generate garbage text; only speed is measured.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import gib, run_measured  # noqa: E402

# llama.cpp llama-bench on this machine, GEMMA_2B shape, Q8_0, 2 threads, median of 3.
LLAMA_CPP = {"prompt": 47.5, "generation": 6.3, "rss": 2.7e9}


def pack(tflite: Path, tokenizer: Path, out: Path, context: int) -> None:
    """A .litertlm holding the prefill/decode graph and the SentencePiece tokenizer."""
    import litert_lm_builder as builder
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    metadata = llm_metadata_pb2.LlmMetadata(max_num_tokens=context)
    metadata.start_token.token_ids.ids.append(2)
    metadata.stop_tokens.add().token_ids.ids.append(1)
    metadata.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(generic_model=llm_model_type_pb2.GenericModel()))
    metadata_path = out.with_suffix(".pb")
    metadata_path.write_bytes(metadata.SerializeToString())
    files = builder.LitertLmFileBuilder()
    files.add_llm_metadata(str(metadata_path))
    files.add_sentencepiece_tokenizer(str(tokenizer))
    files.add_tflite_model(str(tflite), builder.TfLiteModelType.PREFILL_DECODE)
    with open(out, "wb") as handle:
        files.build(handle)


def child(model: Path, threads: int, prompt_tokens: int, generate_tokens: int, context: int, result: Path) -> None:
    import litert_lm as lm

    lm.set_min_log_severity(lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory() as cache:
        info = lm.Benchmark(model_path=str(model), backend=lm.Backend.CPU(thread_count=threads),
                            prefill_tokens=prompt_tokens, decode_tokens=generate_tokens,
                            max_num_tokens=context, cache_dir=cache).run()
    result.write_text(json.dumps({"load": info.init_time_in_second, "prompt": info.last_prefill_tokens_per_second,
                                  "generation": info.last_decode_tokens_per_second,
                                  "prompt_count": info.last_prefill_token_count,
                                  "generation_count": info.last_decode_token_count}))


@click.command()
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="SentencePiece model, to pack a .tflite.")
@click.option("--threads", default=2, show_default=True)
@click.option("--prompt-tokens", default=512, show_default=True, help="llama-bench's default pp512.")
@click.option("--generate-tokens", default=128, show_default=True, help="llama-bench's default tg128.")
@click.option("--context", default=1280, show_default=True, help="The model's KV cache length.")
@click.option("--repeat", default=3, show_default=True)
@click.option("--child-result", type=click.Path(path_type=Path), default=None, hidden=True)
def main(model: Path, tokenizer: Path | None, threads: int, prompt_tokens: int, generate_tokens: int, context: int,
         repeat: int, child_result: Path | None) -> None:
    if child_result is not None:
        child(model, threads, prompt_tokens, generate_tokens, context, child_result)
        return
    with tempfile.TemporaryDirectory() as work:
        if model.suffix != ".litertlm":
            if tokenizer is None:
                raise click.UsageError("--tokenizer is needed to pack a .tflite model")
            packed = Path(work) / "model.litertlm"
            pack(model, tokenizer, packed, context)
            model = packed
        runs = []
        for _ in range(repeat):
            result = Path(work) / "result.json"
            command = [sys.executable, __file__, "--model", str(model), "--threads", str(threads),
                       "--prompt-tokens", str(prompt_tokens), "--generate-tokens", str(generate_tokens),
                       "--context", str(context), "--child-result", str(result)]
            measured = run_measured(command, quiet=False)
            if measured.returncode:
                raise SystemExit(f"LiteRT-LM benchmark failed ({measured.returncode})")
            runs.append({**json.loads(result.read_text()), "rss": measured.peak_rss_bytes})
    ours = {key: statistics.median(run[key] for run in runs) for key in ("load", "prompt", "generation")}
    ours["rss"] = max(run["rss"] for run in runs)
    click.echo(f"{model.name}: {threads} threads, {runs[0]['prompt_count']} prompt tokens, "
               f"{runs[0]['generation_count']} generated, {repeat} runs")
    click.echo(f"{'':22}{'prompt tok/s':>14}{'generation tok/s':>18}{'peak RSS':>12}")
    click.echo(f"{'LiteRT-LM (ours)':22}{ours['prompt']:14.1f}{ours['generation']:18.2f}{gib(int(ours['rss'])):>12}"
               f"   load {ours['load']:.1f} s")
    click.echo(f"{'llama.cpp Q8_0 (rec.)':22}{LLAMA_CPP['prompt']:14.1f}{LLAMA_CPP['generation']:18.2f}"
               f"{gib(int(LLAMA_CPP['rss'])):>12}")
    click.echo(f"ratios (ours / llama.cpp): prompt {ours['prompt'] / LLAMA_CPP['prompt']:.2f}x, generation "
               f"{ours['generation'] / LLAMA_CPP['generation']:.2f}x, peak RSS {ours['rss'] / LLAMA_CPP['rss']:.2f}x")


if __name__ == "__main__":
    main()
