"""`lora-run serve`: the base and its adapters behind a local HTTP server (harness/server.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from converter.errors import ConversionError
from converter.runtime_options import DEFAULTS
from converter.supervisor import Interrupted

from .adapters import named_adapters

INSTALL = "pip install 'lora-convert[serve]'"


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(path_type=Path), required=True, help="Base weights .bin or .task.")
@click.option("--lora", "loras", multiple=True, metavar="[NAME=]PATH",
              help="LoRA weights .bin; repeat for several adapters, each NAME=PATH (a bare PATH is named after its "
                   "file). Requests choose one by name (TGI's adapter_id, OpenAI's model), or base for none.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="SentencePiece model or Hugging Face tokenizer folder [default: the one in the model file].")
@click.option("--max-tokens", default=DEFAULTS.max_tokens, show_default=True,
              help="The largest KV cache a request may use: prompt + output tokens.")
@click.option("--top-k", default=DEFAULTS.top_k, show_default=True, help="Default of requests that give none.")
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True,
              help="Default of requests that give none; 0: greedy.")
@click.option("--random-seed", default=DEFAULTS.random_seed, show_default=True, help="Default of requests that give none.")
@click.option("--prompt-prefix", default=None, help="Chat completions: text before each user turn [default: the .task's].")
@click.option("--prompt-suffix", default=None, help="Chat completions: text after each user turn [default: the .task's].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
def serve(model, loras, tokenizer, max_tokens, top_k, temperature, random_seed, prompt_prefix, prompt_suffix,
          host, port) -> None:
    """Serve the model and its adapters over HTTP: TGI's POST /generate and /generate_stream, OpenAI's
    POST /v1/chat/completions, GET /health and /info. Prints the URL, then serves until Ctrl-C."""
    from .generate import Options
    from .runtime import ReferenceRuntime
    from .template import template_of

    try:
        try:
            from .server import Server, Settings, bind, http_server, url_of
        except ImportError as exc:
            raise ConversionError(f"lora-run serve needs {exc.name}: {INSTALL}") from None
        options = Options(max_tokens, top_k, temperature, random_seed)
        named = named_adapters(loras)
        template = template_of(model, prompt_prefix, prompt_suffix)
        sock = bind(host, port)
        with sock, ReferenceRuntime(model, tokenizer, options) as runtime:
            for name, path in named:
                runtime.add_adapter(name, path)
            server = Server(runtime, Settings(str(model), options, template))
            adapters = ", ".join(runtime.adapters) or "none"
            click.echo(f"serving {model} (adapters: {adapters}) on {url_of(sock)}", err=True)
            click.echo(url_of(sock))
            sys.stdout.flush()
            try:
                http_server(server).run(sockets=[sock])
            except Interrupted:
                pass
            finally:
                server.close()
    except ConversionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo("stopped", err=True)
