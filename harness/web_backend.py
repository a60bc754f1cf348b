"""`--runtime web`: the real MediaPipe web runtime (harness/web_runtime.py: tasks-genai in headless
Chromium, WebGPU on SwiftShader) behind the `Runtime` interface, its defects handled here:

- options are fixed when an `LlmInference` is made: a request with other options gets a new one;
- files under 1 MiB never finish loading: such a file is served from a zero-padded copy;
- a LoRA used before the first base generation crashes the wasm module, and a LoRA not used before
  the next one is loaded computes with that one's weights (`WebRuntime.load_lora` generates around
  each load);
- the gate/up/down (MLP) LoRA weights of the last adapter loaded apply to every adapter (the base
  alone is not affected): switching to an adapter when it or the last one loaded has MLP LoRA
  loads its file again (measured: then right; ~0.4 s on SwiftShader), and an LlmInference is made
  anew after MAX_LOADS loads, so that repeated switching cannot pile up LoRA copies;
- Gemma 2 and 3 start a second generation from what the first left: a new `LlmInference` per prompt;
- the text comes back with the first piece's leading space, which the tokenizer's decode drops.
The browser is driven from one thread of its own (Playwright's sync API is bound to its thread),
so `lora-run serve`'s worker thread may call it.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from bundler.inspect import LORA_NAME
from bundler.task import open_weights
from converter.errors import ConversionError
from converter.files import regular_file
from converter.tflite import WeightFile

from .generate import Generation, Options, Vocabulary, check_room, prompt_ids, read_vocabulary
from .reference import context_of, family_of
from .runtime import OnText, Runtime

INSTALL = "pip install 'lora-convert[web]'"
SMALLEST = 1 << 20  # bytes: smaller files never finish loading
STATEFUL_FAMILIES = ("gemma2", "gemma3")  # a second generation in one LlmInference starts from the first's state
MLP_TARGET = "ff_layer."  # LoRA tensor names of the gate/up/down projections
MAX_LOADS = 32  # LoRA loads into one LlmInference before it is made anew
T = TypeVar("T")


@dataclass(frozen=True)
class WebAdapter:
    path: Path  # the file served (a padded copy when the original is under 1 MiB)
    rank: int
    mlp: bool  # has gate/up/down LoRA weights


class WebBackend(Runtime[WebAdapter]):
    """A base GPU weights .bin in one browser; adapters loaded into its LlmInference as needed."""

    def __init__(self, model: Path, options: Options, timeouts=None):
        super().__init__()
        from . import web_runtime

        weights, task = open_weights(Path(model), "--model")
        if task is not None:
            raise ConversionError(f"--model {model}: the web runtime does not load a .task that wraps GPU weights "
                                  "(it fails with 'interpreter != nullptr'); give the base .bin itself")
        if weights.lora_rank is not None:
            raise ConversionError(f"--model {model} is a LoRA weights file: give it as --lora, with its base as --model")
        try:
            import playwright  # noqa: F401
        except ImportError:
            raise ConversionError(f"--runtime web needs Playwright: {INSTALL}") from None
        reason = web_runtime.missing(web_runtime.CHROMIUM, web_runtime.PACKAGE_DIR)
        if reason:
            raise ConversionError(f"--runtime web: {reason}")
        self.vocabulary: Vocabulary = read_vocabulary(model, None, weights, None)
        self.context = context_of(weights)
        self.fresh_per_prompt = family_of(weights).name in STATEFUL_FAMILIES
        self._copies = Path(tempfile.mkdtemp(prefix="lora-run-web-"))
        self.model = self._servable(Path(model))
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-run-web")
        self._web: web_runtime.WebRuntime | None = None
        self._state: tuple | None = None  # (options, ranks) of the LlmInference in the page
        self._loaded: dict[WebAdapter, str] = {}  # adapters loaded into it, in load order, and their handles
        self._loads = 0  # LoRA loads into it
        try:
            self._web = self._call(lambda: web_runtime.WebRuntime(web_runtime.PACKAGE_DIR, web_runtime.CHROMIUM,
                                                                  timeouts or web_runtime.Timeouts()).__enter__())
        except BaseException:
            self.close()
            raise

    def _call(self, step: Callable[[], T]) -> T:
        """Run a browser step on the browser's thread; its failure as one line."""
        from .web_runtime import WebRuntimeError

        try:
            return self._thread.submit(step).result()
        except WebRuntimeError as exc:
            raise ConversionError(f"web runtime: {str(exc).splitlines()[0]}") from None

    def _servable(self, path: Path) -> Path:
        """`path`, or a copy zero-padded to 1 MiB when it is smaller (the converter pads its own files)."""
        size = regular_file(path, "--model").stat().st_size
        if size >= SMALLEST:
            return path.resolve()
        copy = self._copies / f"{len(list(self._copies.iterdir()))}-{path.name}"
        shutil.copyfile(path, copy)
        with open(copy, "ab") as handle:
            handle.write(bytes(SMALLEST - size))
        return copy

    def close(self) -> None:
        """Stop the browser (at once: a generation under way, e.g. at Ctrl-C, is not waited for)."""
        if getattr(self, "_thread", None) is not None:
            if self._web is not None:
                self._web.kill()
                self._thread.submit(self._web.close).result()
                self._web = None
            self._thread.shutdown()
        shutil.rmtree(self._copies, ignore_errors=True)

    # -- the runtime ------------------------------------------------------------------------------
    def prompt_tokens(self, prompt: str) -> int:
        return len(prompt_ids(self.vocabulary, prompt))

    def _load_adapter(self, path: Path) -> WebAdapter:
        weights = WeightFile(regular_file(path, "--lora"))
        if weights.lora_rank is None:
            raise ConversionError(f"--lora {path}: a base model's weights file, not a LoRA weights file")
        targets = {match.group(2) for match in map(LORA_NAME.search, weights.tensors) if match}
        return WebAdapter(self._servable(path), weights.lora_rank, any(t.startswith(MLP_TARGET) for t in targets))

    def _generate(self, prompt: str, options: Options, adapter: WebAdapter | None, on_text: OnText | None) -> Generation:
        check_room(self.prompt_tokens(prompt), options, self.context)
        text, seconds = self._call(lambda: self._run(prompt, options, adapter))
        text = text[1:] if text.startswith(" ") else text
        if on_text is not None and text:
            on_text(text)  # the runtime gives the whole text at once
        # The runtime reports text, not token ids: the output's ids are its text tokenized again.
        return Generation(self.vocabulary.tokenizer.encode(text), text, seconds)

    def _run(self, prompt: str, options: Options, adapter: WebAdapter | None) -> tuple[str, float]:
        """On the browser's thread: the LlmInference and LoRA the request needs, then its generation
        (its text, and the seconds it took without the loading)."""
        web = self._web
        if web is None:
            raise ConversionError("web runtime: already closed")
        ranks = sorted({a.rank for a in self._adapters.values()})
        if self._state != (options, ranks) or self.fresh_per_prompt or self._loads >= MAX_LOADS:
            web.load_model(self.model, options, lora_ranks=ranks or None)
            self._state, self._loaded, self._loads = (options, ranks), {}, 0
        if adapter is not None:
            last = list(self._loaded)[-1] if self._loaded else None
            if adapter not in self._loaded or (last != adapter and (adapter.mlp or (last is not None and last.mlp))):
                self._loaded.pop(adapter, None)
                self._loaded[adapter] = web.load_lora(adapter.path)  # now the last loaded
                self._loads += 1
        start = time.perf_counter()
        text = web.generate(prompt, self._loaded[adapter] if adapter is not None else None)
        return text, time.perf_counter() - start
