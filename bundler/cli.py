"""`lora-bundle`: bundle (MediaPipe's BundleConfig options), `inspect`, `package`."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from converter.errors import ConversionError
from converter.runtime_options import DEFAULTS, RuntimeOptions
from converter.version import version_option
from converter.supervisor import SupervisedGroup

from .config import FORMATS, BundleConfig


ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def unescape(text: str | None) -> str | None:
    """Shell-typed `\\n`, `\\t` and `\\\\` in prompt options become newline, tab, backslash."""
    if text is None:
        return None
    return re.sub(r"\\[nt\\]", lambda m: ESCAPES[m.group(0)], text)


def fail(exc: ConversionError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group(cls=SupervisedGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@version_option("lora-bundle")
@click.option("--tflite-model", help="GPU weights file from lora-convert (or MediaPipe).")
@click.option("--tokenizer-model",
              help="SentencePiece tokenizer.model, or a Hugging Face tokenizer folder (tokenizer.json as it is for "
                   ".litertlm, converted to SentencePiece for .task).")
@click.option("--start-token", help="Start token, e.g. <bos>.")
@click.option("--no-start-token", is_flag=True,
              help="Put no start token before the prompt (.litertlm only; Qwen 2.5 has none).")
@click.option("--stop-tokens", multiple=True, help="Stop token (repeat for several).")
@click.option("--output-filename", help="Bundle path (.task / .litertlm is appended if missing).")
@click.option("--enable-bytes-to-unicode-mapping", is_flag=True, help="GPT-2 style byte-to-unicode tokenizer I/O.")
@click.option("--system-prompt", default=None, help="Session prefix of the prompt template.")
@click.option("--prompt-prefix", default=None, help="Text put before each user prompt.")
@click.option("--prompt-suffix", default=None, help="Text put after each user prompt (\\n and \\t are unescaped).")
@click.option("--format", "format_", type=click.Choice(FORMATS), default="task", show_default=True,
              help="task: MediaPipe LLM Inference; litertlm: LiteRT-LM.")
@click.pass_context
def main(ctx: click.Context, tflite_model, tokenizer_model, start_token, no_start_token, stop_tokens, output_filename,
         enable_bytes_to_unicode_mapping, system_prompt, prompt_prefix, prompt_suffix, format_) -> None:
    """Bundle a converted model with its tokenizer and tokens, or inspect / package bundles.

    \b
    lora-bundle --tflite-model M.bin --tokenizer-model T.model --start-token "<bos>" \\
                --stop-tokens "<eos>" --output-filename out/model.task
    lora-bundle inspect out/model.task [--json]
    lora-bundle package out/model.task --lora out/adapter.bin --platform android --output dist/android
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--tflite-model", tflite_model), ("--tokenizer-model", tokenizer_model),
                                        ("--start-token", start_token or no_start_token),
                                        ("--output-filename", output_filename))
               if not value]
    if not stop_tokens:
        missing.append("--stop-tokens")
    if missing:
        raise click.UsageError(f"missing option(s) {', '.join(missing)}")
    if start_token and no_start_token:
        raise click.UsageError("give --start-token or --no-start-token, not both")
    from .build import write_bundle

    try:
        path = write_bundle(BundleConfig(
            tflite_model=tflite_model, tokenizer_model=tokenizer_model, start_token=None if no_start_token else start_token,
            stop_tokens=list(stop_tokens), output_filename=output_filename,
            enable_bytes_to_unicode_mapping=enable_bytes_to_unicode_mapping, system_prompt=unescape(system_prompt),
            prompt_prefix=unescape(prompt_prefix), prompt_suffix=unescape(prompt_suffix), format=format_,
        ))
    except ConversionError as exc:
        fail(exc)
    click.echo(f"wrote {path}", err=True)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-hash", is_flag=True, help="Skip sha256 (faster on multi-GB files).")
def inspect(path: Path, as_json: bool, no_hash: bool) -> None:
    """Entries, tensors, parameters, LoRA rank and targets, tokenizer and tokens of a .task or .bin."""
    from .inspect import describe, format_text

    try:
        info = describe(path, with_hashes=not no_hash)
    except ConversionError as exc:
        fail(exc)
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--lora", "loras", multiple=True, metavar="[NAME=]PATH", help="LoRA weights file (repeatable).")
@click.option("--platform", type=click.Choice(["android", "ios"]), required=True)
@click.option("--output", type=click.Path(path_type=Path), required=True,
              help="Folder to write: new, empty, or an earlier package (replaced as a whole).")
@click.option("--pack-name", default="llm", show_default=True, help="Asset pack / resource folder name.")
@click.option("--delivery", type=click.Choice(["install-time", "fast-follow", "on-demand"]), default="install-time",
              show_default=True, help="Play Asset Delivery type (Android).")
@click.option("--max-tokens", default=DEFAULTS.max_tokens, show_default=True)
@click.option("--top-k", default=DEFAULTS.top_k, show_default=True)
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True)
@click.option("--random-seed", default=DEFAULTS.random_seed, show_default=True)
def package(model: Path, loras, platform, output, pack_name, delivery, max_tokens, top_k, temperature,
            random_seed) -> None:
    """Lay out MODEL (.task or .bin) and LoRA files for an Android or iOS app, with manifests."""
    from .package import package as make_package, parse_lora

    try:
        result = make_package(model, [parse_lora(v) for v in loras], platform, output, pack_name, delivery,
                              RuntimeOptions(max_tokens, top_k, temperature, random_seed))
    except ConversionError as exc:
        fail(exc)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {len(result.files)} files and manifests under {result.folder}", err=True)


if __name__ == "__main__":
    main()
