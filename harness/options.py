"""The options `lora-run`, `lora-run eval` and `lora-run serve` share, declared once."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from converter.runtime_options import DEFAULTS

from .runtimes import BACKENDS, RUNTIMES

FILE = click.Path(path_type=Path)
Decorator = Callable[[Callable], Callable]


def together(*decorators: Decorator) -> Decorator:
    """Several click options as one decorator, listed in --help in the order given."""
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return apply


def model(multiple: bool = False) -> Decorator:
    more = " Repeat to compare encodings of one base (int8, int4, ...)." if multiple else ""
    return click.option("--model", "models" if multiple else "model", type=FILE, multiple=multiple, required=True,
                        help="Base model: GPU weights .bin or .task (reference), .bin (web), .litertlm (litertlm)."
                             + more)


lora = click.option("--lora", "loras", multiple=True, metavar="[NAME=]PATH",
                    help="LoRA weights .bin; repeat for several adapters on the one base, each NAME=PATH (a bare PATH "
                         "is named after its file).")
tokenizer = click.option("--tokenizer", type=FILE, default=None,
                         help="SentencePiece model or Hugging Face tokenizer folder [default: the one in the model "
                              "file]; reference runtime only.")
max_tokens = click.option("--max-tokens", default=DEFAULTS.max_tokens, show_default=True,
                          help="KV-cache size: prompt + output tokens, at most the model's context.")
sampling = together(
    click.option("--top-k", default=DEFAULTS.top_k, show_default=True),
    click.option("--temperature", default=DEFAULTS.temperature, show_default=True, help="0: greedy."),
    click.option("--random-seed", default=DEFAULTS.random_seed, show_default=True),
)
runtime = together(
    click.option("--runtime", type=click.Choice(RUNTIMES), default=RUNTIMES[0], show_default=True,
                 help="reference: our CPU runtime (any family); web: MediaPipe's web runtime in headless Chromium "
                      "(pip install 'lora-convert[web]', bash scripts/setup_web.sh); litertlm: Google's LiteRT-LM "
                      "(pip install 'lora-convert[litertlm]')."),
    click.option("--backend", type=click.Choice(BACKENDS), default=None,
                 help="With --runtime litertlm: gpu (a .litertlm of GPU weights) or cpu (of prefill/decode graphs) "
                      "[default: gpu]."),
)
