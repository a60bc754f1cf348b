"""`lora-run`: generate text from our files on the reference CPU runtime, or compare it with transformers."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from converter.errors import ConversionError
from converter.runtime_options import DEFAULTS
from converter.version import version_option
from converter.supervisor import SupervisedCommand

from .inputs import check_prompt, tolerant_stdout

DIRECTORY = click.Path(path_type=Path)


@click.command(cls=SupervisedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("lora-run")
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Base weights .bin or .task.")
@click.option("--lora", type=click.Path(path_type=Path), default=None, help="LoRA weights .bin (loraPath).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="SentencePiece model or Hugging Face tokenizer folder [default: the one in the model file].")
@click.option("--prompt", required=True)
@click.option("--max-tokens", default=DEFAULTS.max_tokens, show_default=True, help="KV-cache size: prompt + output tokens, at most the model's context.")
@click.option("--top-k", default=DEFAULTS.top_k, show_default=True)
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True, help="0: greedy.")
@click.option("--random-seed", default=DEFAULTS.random_seed, show_default=True)
@click.option("--compare", is_flag=True,
              help="Instead of generating, run the prompt through our files and through transformers "
                   "(+ PEFT) and print the per-layer differences.")
@click.option("--hf-model", type=DIRECTORY, default=None, help="With --compare: the Hugging Face checkpoint directory.")
@click.option("--hf-lora", type=DIRECTORY, default=None, help="With --compare: the PEFT adapter directory (with --lora).")
@click.option("--tolerance", type=float, default=None,
              help="With --compare: relative difference that counts as wrong [default: per weight encoding].")
def main(model, lora, tokenizer, prompt, max_tokens, top_k, temperature, random_seed,
         compare, hf_model, hf_lora, tolerance) -> None:
    """Stream a generation to stdout and report tokens/s on stderr (or, with --compare, a layer-by-layer diff)."""
    from .generate import Options, generate, load

    tolerant_stdout()
    try:
        options = Options(max_tokens, top_k, temperature, random_seed)
        check_prompt(prompt)
        if compare:
            from .compare import run_compare

            click.echo(run_compare(model, lora, tokenizer, prompt, hf_model, hf_lora, tolerance))
            return
        loaded = load(model, lora, tokenizer, options)
        result = generate(loaded, prompt, options, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    except ConversionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo()
    click.echo(f"{len(result.ids)} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s)", err=True)


if __name__ == "__main__":
    main()
