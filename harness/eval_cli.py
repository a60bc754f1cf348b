"""`lora-run eval DATA.jsonl`: score the base and each adapter on supervised examples, per model file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from converter.errors import ConversionError
from converter.files import atomic_output, check_output, refuse_overwrite, regular_file

from . import options as shared
from .adapters import named_adapters
from .inputs import tolerant_stdout

FILE = click.Path(path_type=Path)


def check_models(models: tuple[Path, ...]) -> list[Path]:
    """The --model files, each existing and given once."""
    checked: list[Path] = []
    for model in models:
        regular_file(model, "--model")
        if any(model.resolve() == seen.resolve() for seen in checked):
            raise ConversionError(f"--model {model} is given twice")
        checked.append(model)
    return checked


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", type=FILE)
@shared.model(multiple=True)
@shared.lora
@click.option("--prompt-prefix", default=None,
              help="Text put before each user turn (\\n and \\t are unescaped) [default: the .task's template].")
@click.option("--prompt-suffix", default=None,
              help="Text put after each user turn (\\n and \\t are unescaped) [default: the .task's template].")
@shared.max_tokens
@shared.runtime
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON instead of tables.")
@click.option("--report", type=FILE, default=None, help="Also write an HTML report with a chart of the scores.")
@click.option("--strict", is_flag=True,
              help="Refuse the data file at its first malformed line, or an example that cannot be generated, "
                   "instead of skipping it / scoring it 0.")
def eval_command(data, models, loras, prompt_prefix, prompt_suffix, max_tokens, runtime, backend, as_json, report,
                 strict) -> None:
    """Generate greedily for each example of DATA (JSONL: chat {"messages": [...]}, the last assistant
    turn the reference; or Alpaca {"instruction", "input", "output"}) with the base and each adapter,
    and report exact match, token F1 and ROUGE-L per example and on average."""
    from tqdm import tqdm

    from .eval_data import read_examples
    from .eval_report import as_html, as_json as json_document, as_text
    from .evaluate import Result, evaluate
    from .metrics import check_available
    from .runtimes import check_choice

    tolerant_stdout()
    try:
        check_available()
        check_choice(runtime, backend)
        checked = check_models(models)
        named = named_adapters(loras)
        if report is not None:
            check_output(report, "--report")
            refuse_overwrite([("--report", report)], [("DATA", data)] + [("--model", m) for m in checked]
                             + [("--lora", path) for _, path in named])
        examples = read_examples(data, strict)
        for line, why in examples.skipped:
            click.echo(f"warning: {data} line {line}: {why}; skipped", err=True)
        total = len(checked) * (1 + len(named)) * len(examples.examples)
        with tqdm(total=total, desc="eval", unit="generation", file=sys.stderr, disable=None, leave=False) as bar:
            def step(result: Result) -> None:
                bar.update()
                if result.error is not None:
                    bar.write(f"warning: {data} line {result.line} ({result.model}, {result.adapter}): "
                              f"{result.error}; scored 0", file=sys.stderr)

            evaluation = evaluate(checked, named, examples.examples, max_tokens, prompt_prefix, prompt_suffix,
                                  step, strict, runtime, backend)
        document = json_document(evaluation, examples)
        if report is not None:
            with atomic_output(report, "--report") as handle:
                handle.write(as_html(document, str(data)).encode("utf-8"))
    except ConversionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(document, indent=2, ensure_ascii=False) if as_json else as_text(document))
