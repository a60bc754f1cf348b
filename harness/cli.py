"""`lora-run`: generate text from our files on the reference CPU runtime or a real one (--runtime), or compare
the reference runtime with transformers."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from converter.errors import ConversionError
from converter.version import version_option
from converter.supervisor import SupervisedCommand

from . import options as shared
from .adapters import BASE, named_adapters, unknown_adapter
from .inputs import check_prompt, tolerant_stdout

DIRECTORY = click.Path(path_type=Path)


def choose_adapter(named: list[tuple[str, Path]], adapter: str | None) -> str | None:
    """The adapter the prompt runs with (None: the base): --adapter's, else the only --lora's."""
    names = [name for name, _ in named]
    if adapter is None:
        if len(names) > 1:
            raise ConversionError(f"--adapter NAME is required with several --lora: one of {', '.join(names)}, "
                                  f"or {BASE} for the base model")
        return names[0] if names else None
    if adapter == BASE:
        return None
    if adapter not in names:
        raise ConversionError(f"--adapter: {unknown_adapter(adapter, names)}")
    return adapter


def _eval() -> click.Command:
    from .eval_cli import eval_command

    return eval_command


def _serve() -> click.Command:
    from .serve_cli import serve

    return serve


SUBCOMMANDS = {"eval": _eval, "serve": _serve}  # `lora-run NAME ...`: a command of its own, loaded when named


class RunCommand(SupervisedCommand):
    """`lora-run`, whose first argument may instead name one of SUBCOMMANDS (`lora-run eval ...`)."""

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in SUBCOMMANDS:
            return SUBCOMMANDS[args[0]]().main(args[1:], f"{prog_name or 'lora-run'} {args[0]}", **extra)
        return super().main(args, prog_name, **extra)


@click.command(cls=RunCommand, context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Also: lora-run eval DATA.jsonl --model ... (scores on supervised examples) and lora-run serve "
                      "--model ... (a local HTTP server); see their --help.")
@version_option("lora-run")
@shared.model()
@shared.lora
@click.option("--adapter", default=None, metavar="NAME",
              help=f"The --lora adapter to generate with, or '{BASE}' for none [default: the only --lora].")
@shared.tokenizer
@click.option("--prompt", required=True)
@shared.max_tokens
@shared.sampling
@shared.runtime
@click.option("--compare", is_flag=True,
              help="Instead of generating, run the prompt through our files and through transformers "
                   "(+ PEFT) and print the per-layer differences (reference runtime only).")
@click.option("--hf-model", type=DIRECTORY, default=None, help="With --compare: the Hugging Face checkpoint directory.")
@click.option("--hf-lora", type=DIRECTORY, default=None, help="With --compare: the PEFT adapter directory (with --lora).")
@click.option("--tolerance", type=float, default=None,
              help="With --compare: relative difference that counts as wrong [default: per weight encoding].")
def main(model, loras, adapter, tokenizer, prompt, max_tokens, top_k, temperature, random_seed, runtime, backend,
         compare, hf_model, hf_lora, tolerance) -> None:
    """Stream a generation to stdout and report tokens/s on stderr (or, with --compare, a layer-by-layer diff)."""
    from .generate import Options
    from .runtimes import check_choice, open_runtime

    tolerant_stdout()
    try:
        options = Options(max_tokens, top_k, temperature, random_seed)
        check_prompt(prompt)
        check_choice(runtime, backend, tokenizer)
        if compare and runtime != "reference":
            raise ConversionError(f"--compare runs the reference runtime's layers; it does not go with --runtime {runtime}")
        named = named_adapters(loras)
        chosen = choose_adapter(named, adapter)
        if compare:
            from .compare import run_compare

            lora = dict(named)[chosen] if chosen else None
            click.echo(run_compare(model, lora, tokenizer, prompt, hf_model, hf_lora, tolerance))
            return
        with open_runtime(runtime, backend, model, tokenizer, options) as running:
            for name, path in named:
                running.add_adapter(name, path)
            result = running.generate(prompt, options, chosen,
                                      on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    except ConversionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo()
    click.echo(f"{len(result.ids)} tokens in {result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s)", err=True)


if __name__ == "__main__":
    main()
