"""One interface over the runtimes `lora-run` drives: a base model loaded once, LoRA adapters added
by name, and each generation run with one of them or with none (the base). `lora-run`'s clients
(prompting, evaluation, serving) talk to a `Runtime`, never to a runtime's own calls;
`ReferenceRuntime` is the reference CPU runtime's implementation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Callable, Generic, TypeVar

from converter.errors import ConversionError
from converter.files import regular_file
from converter.tflite import WeightFile

from .adapters import BASE, check_adapter_name, unknown_adapter
from .generate import Generation, LoadedModel, Options, generate, load, prompt_ids
from .inputs import check_prompt
from .reference import Adapter

OnText = Callable[[str], object]
OnToken = Callable[[int | None, str], object]  # a generated token's id (None: the runtime gives none) and its text
Handle = TypeVar("Handle")  # what a runtime keeps per adapter (its weights, a runtime's own handle)
Self = TypeVar("Self", bound="Runtime")


class Runtime(ABC, Generic[Handle]):
    """A base model loaded once, with named LoRA adapters chosen per request; a context manager.

    An implementation loads the base in its constructor and gives `_load_adapter` (read and check a
    LoRA file against the base, return what `_generate` needs to apply it) and `_generate`; names,
    lookups and the prompt's check are common."""

    def __init__(self) -> None:
        self._adapters: dict[str, Handle] = {}

    @property
    def adapters(self) -> list[str]:
        """The adapters' names, in the order they were added."""
        return list(self._adapters)

    def add_adapter(self, name: str, path: Path) -> None:
        check_adapter_name(name, path, self.adapters)
        self._adapters[name] = self._load_adapter(Path(path))

    def generate(self, prompt: str, options: Options, adapter: str | None = None,
                 on_text: OnText | None = None, on_token: OnToken | None = None) -> Generation:
        """Generate from `prompt` with the named adapter (None or `base`: the base model alone),
        calling `on_text(piece)` with each new piece of text as it is decoded, or instead
        `on_token(id, piece)` per generated token (id None where the runtime gives text only)."""
        check_prompt(prompt)
        if adapter is not None and adapter != BASE and adapter not in self._adapters:
            raise ConversionError(unknown_adapter(adapter, self.adapters))
        handle = None if adapter is None or adapter == BASE else self._adapters[adapter]
        if on_token is not None:
            return self._generate_tokens(prompt, options, handle, on_token)
        return self._generate(prompt, options, handle, on_text)

    @abstractmethod
    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens of the KV cache (--max-tokens) the prompt takes, start token included."""

    @abstractmethod
    def _load_adapter(self, path: Path) -> Handle: ...

    @abstractmethod
    def _generate(self, prompt: str, options: Options, adapter: Handle | None, on_text: OnText | None) -> Generation: ...

    def _generate_tokens(self, prompt: str, options: Options, adapter: Handle | None,
                         on_token: OnToken) -> Generation:
        """`_generate` with a callback per token; a runtime that streams text only gives each piece without an id."""
        return self._generate(prompt, options, adapter, lambda piece: on_token(None, piece))

    def close(self) -> None:
        """Release what the runtime holds (a browser, an engine); safe to call twice."""

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReferenceRuntime(Runtime[Adapter]):
    """The reference CPU runtime: the base weights read once; each adapter's LoRA matrices are kept
    apart and added to the base's products only in the generations that choose it."""

    def __init__(self, model: Path, tokenizer: Path | None = None, options: Options | None = None):
        super().__init__()
        self.loaded: LoadedModel = load(model, None, tokenizer, options)

    def prompt_tokens(self, prompt: str) -> int:
        return len(prompt_ids(self.loaded, prompt))

    def _load_adapter(self, path: Path) -> Adapter:
        return self.loaded.model.read_adapter(WeightFile(regular_file(path, "--lora")))

    def _generate(self, prompt: str, options: Options, adapter: Adapter | None, on_text: OnText | None) -> Generation:
        return generate(self._with(adapter), prompt, options, on_text)

    def _generate_tokens(self, prompt: str, options: Options, adapter: Adapter | None, on_token: OnToken) -> Generation:
        return generate(self._with(adapter), prompt, options, on_token=on_token)

    def _with(self, adapter: Adapter | None) -> LoadedModel:
        return replace(self.loaded, model=self.loaded.model.with_adapter(adapter))
