"""`lora-run serve`: the base and its adapters behind a local HTTP server (harness/server.py)."""
from __future__ import annotations

import sys

import click

from converter.errors import ConversionError
from converter.supervisor import Interrupted

from . import options as shared
from .adapters import named_adapters

INSTALL = "pip install 'lora-convert[serve]'"


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@shared.model()
@shared.lora
@shared.tokenizer
@shared.max_tokens
@shared.sampling
@shared.runtime
@click.option("--prompt-prefix", default=None, help="Chat completions: text before each user turn [default: the .task's].")
@click.option("--prompt-suffix", default=None, help="Chat completions: text after each user turn [default: the .task's].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
def serve(model, loras, tokenizer, max_tokens, top_k, temperature, random_seed, runtime, backend, prompt_prefix,
          prompt_suffix, host, port) -> None:
    """Serve the model and its adapters over HTTP: TGI's POST /generate and /generate_stream, OpenAI's
    POST /v1/chat/completions, GET /health and /info. Prints the URL, then serves until Ctrl-C.
    --max-tokens is the largest KV cache a request may use (prompt + output); --top-k, --temperature
    and --random-seed are the defaults of requests that give none; requests choose an adapter by
    name (TGI's adapter_id, OpenAI's model), or base for none."""
    from .generate import Options
    from .runtimes import check_choice, open_runtime
    from .template import template_of

    try:
        try:
            from .server import Server, Settings, bind, http_server, url_of
        except ImportError as exc:
            raise ConversionError(f"lora-run serve needs {exc.name}: {INSTALL}") from None
        options = Options(max_tokens, top_k, temperature, random_seed)
        check_choice(runtime, backend, tokenizer)
        named = named_adapters(loras)
        template = template_of(model, prompt_prefix, prompt_suffix)
        sock = bind(host, port)
        with sock, open_runtime(runtime, backend, model, tokenizer, options) as running:
            for name, path in named:
                running.add_adapter(name, path)
            server = Server(running, Settings(str(model), options, template))
            adapters = ", ".join(running.adapters) or "none"
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
