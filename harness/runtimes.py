"""The runtimes `lora-run`, `lora-run eval` and `lora-run serve` drive (`--runtime`, `--backend`):
each a `Runtime` in a module of its own, imported only when chosen (this module is light: no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from converter.errors import ConversionError
from converter.runtime_options import RuntimeOptions as Options

if TYPE_CHECKING:
    from .runtime import Runtime

RUNTIMES = ("reference", "web", "litertlm")
BACKENDS = ("gpu", "cpu")


def check_choice(runtime: str, backend: str | None, tokenizer: Path | None = None) -> None:
    """Refuse option combinations no runtime takes, before anything loads."""
    if backend is not None and runtime != "litertlm":
        raise ConversionError(f"--backend {backend} goes with --runtime litertlm (--runtime {runtime} has one backend)")
    if tokenizer is not None and runtime != "reference":
        raise ConversionError(f"--tokenizer: --runtime {runtime} uses the tokenizer in the model file; "
                              "only --runtime reference takes another")


def open_runtime(runtime: str, backend: str | None, model: Path, tokenizer: Path | None, options: Options) -> "Runtime":
    """The chosen runtime with `model` loaded (options: the defaults, and --max-tokens the largest KV cache)."""
    check_choice(runtime, backend, tokenizer)
    if runtime == "web":
        from .web_backend import WebBackend

        return WebBackend(model, options)
    if runtime == "litertlm":
        from .litertlm_runtime import LiteRTLMRuntime

        return LiteRTLMRuntime(model, options, backend or "gpu")
    from .runtime import ReferenceRuntime

    return ReferenceRuntime(model, tokenizer, options)
