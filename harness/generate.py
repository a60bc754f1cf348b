"""Text generation over the reference runtime, with MediaPipe LLM Inference's options.

`max_tokens` is the KV-cache size (start token + prompt + output) as in MediaPipe, at most the
model's context and what fits in free memory (checked before allocating); sampling is
top-k with temperature (greedy when temperature is 0 or top-k is 1), seeded by `random_seed`.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator

import sentencepiece as spm
import torch

from bundler.task import TOKENIZER_ENTRY, TaskFile, open_weights
from converter.errors import ConversionError
from converter.files import regular_file
from converter.hf_tokenizer import is_converted_hf_tokenizer
from converter.models.base import Dims
from converter.runtime_options import RuntimeOptions as Options
from converter.tflite import SPM_VOCAB_MODEL, WeightFile
from converter.tokenizer import check_tokenizer_size, load_tokenizer, parse_sentencepiece

from .linear import threads_for
from .memory import available_bytes, generation_bytes, size_text
from .reference import ReferenceModel, context_of, family_of


@dataclass
class LoadedModel:
    model: ReferenceModel
    tokenizer: spm.SentencePieceProcessor
    start_id: int
    stop_ids: set[int]
    byte_level: bool = False  # a Hugging Face BPE vocabulary: spaces are "Ġ" pieces (see `runtime_text`)


@dataclass(frozen=True)
class Vocabulary:
    """A model file's tokenizer and start/stop tokens, without its weights (what the real runtimes' clients need)."""

    tokenizer: spm.SentencePieceProcessor
    start_id: int
    stop_ids: set[int]
    byte_level: bool = False


BYTE_LEVEL_SPACE = "\u0120"  # "Ġ", GPT-2 byte-level BPE's space


def runtime_text(loaded: LoadedModel | Vocabulary, prompt: str) -> str:
    """The prompt as the runtime tokenizes it: with a byte-level BPE vocabulary it writes each space
    as "Ġ" (observed in the web runtime with FALCON_RW_1B; other bytes' mapping is unobserved)."""
    return prompt.replace(" ", BYTE_LEVEL_SPACE) if loaded.byte_level else prompt


def load(model_path: Path, lora_path: Path | None = None, tokenizer_path: Path | None = None,
         options: Options | None = None) -> LoadedModel:
    """A .bin (tokenizer embedded or given) or a .task (tokenizer and tokens from the bundle); a given
    tokenizer is a SentencePiece file or a Hugging Face tokenizer folder (converted as lora-convert does).
    With `options`, their --max-tokens is checked against the model's context before any weight is read."""
    weights, task = open_weights(Path(model_path), "--model")
    if weights.lora_rank is not None:
        raise ConversionError(f"--model {model_path} is a LoRA weights file: give it as --lora, "
                              "with its base model as --model")
    if options is not None:
        check_context(options, context_of(weights))
    lora = WeightFile(regular_file(lora_path, "--lora")) if lora_path else None
    vocabulary = read_vocabulary(model_path, tokenizer_path, weights, task)
    return LoadedModel(ReferenceModel(weights, lora), vocabulary.tokenizer, vocabulary.start_id, vocabulary.stop_ids,
                       vocabulary.byte_level)


def read_vocabulary(model_path: Path, tokenizer_path: Path | None = None, weights: WeightFile | None = None,
                    task: TaskFile | None = None) -> Vocabulary:
    """The tokenizer (given, else the .task's or the one embedded in the .bin) and start/stop tokens
    of a model file (`weights`, `task`: its `open_weights`, when already opened)."""
    if weights is None:
        weights, task = open_weights(Path(model_path), "--model")
    given = load_tokenizer(Path(tokenizer_path), "--tokenizer")[0] if tokenizer_path else None
    if task is not None:
        blob = given or task.read(TOKENIZER_ENTRY)
        tokenizer = parse_sentencepiece(blob, f"{model_path}: entry {TOKENIZER_ENTRY}")
        metadata = task.metadata()
        start_id = tokenizer.piece_to_id(metadata.start_token)
        stops = list(metadata.stop_tokens)
    else:
        blob = given or weights.metadata.get(SPM_VOCAB_MODEL)
        if not blob:
            raise ConversionError(f"{model_path} has no embedded tokenizer; pass --tokenizer")
        tokenizer = parse_sentencepiece(blob, f"{model_path}: metadata {SPM_VOCAB_MODEL}")
        params = weights.parameters
        start_id = params.start_token_id if params.HasField("start_token_id") else tokenizer.piece_to_id(params.start_token)
        stops = list(params.stop_tokens)
    rows = weights.parameters.vocab_size
    check_tokenizer_size(blob, tokenizer.get_piece_size(), rows, family_of(weights).untokenized_rows,
                         f"--tokenizer {tokenizer_path}" if given else "the tokenizer", str(model_path))
    if not 0 <= start_id < rows:
        raise ConversionError(f"{model_path}: start token id {start_id} is not one of its {rows} embedding rows")
    return Vocabulary(tokenizer, start_id, {tokenizer.piece_to_id(s) for s in stops}, is_converted_hf_tokenizer(blob))


def check_context(options: Options, context: int) -> None:
    """Refuse a KV cache (--max-tokens) larger than the model's context."""
    if context and options.max_tokens > context:
        raise ConversionError(f"--max-tokens {options.max_tokens}: more than the model's context of {context} "
                              f"tokens (prompt + output); use at most --max-tokens {context}")


def check_room(prompt_tokens: int, options: Options, context: int = 0) -> None:
    """Refuse a prompt that leaves no room for output in the KV cache (--max-tokens)."""
    if prompt_tokens >= options.max_tokens:
        known = f" (the model's context: {context})" if context else ""
        raise ConversionError(f"the prompt takes {prompt_tokens} tokens (start token included); --max-tokens "
                              f"{options.max_tokens} leaves no room for output: raise it{known} or shorten the prompt")


def sample(logits: torch.Tensor, options: Options, generator: torch.Generator) -> int:
    if options.temperature <= 0 or options.top_k == 1:
        return int(logits.argmax())
    values, indices = logits.topk(min(options.top_k, logits.numel()))
    probabilities = torch.softmax(values / options.temperature, -1)
    return int(indices[torch.multinomial(probabilities, 1, generator=generator)])


def prompt_ids(loaded: LoadedModel | Vocabulary, prompt: str) -> list[int]:
    """The start token and the prompt's tokens, as the runtime feeds them."""
    return [loaded.start_id] + loaded.tokenizer.encode(runtime_text(loaded, prompt))


def generate_ids(loaded: LoadedModel, prompt: str, options: Options) -> Generator[int, None, int | None]:
    """Token ids as they are generated, until a stop token (returned, not yielded) or the KV cache is full."""
    ids = prompt_ids(loaded, prompt)
    check_context(options, loaded.model.context)
    check_room(len(ids), options, loaded.model.context)
    check_memory(loaded.model.dims, options, len(ids))
    generator = torch.Generator().manual_seed(options.random_seed)
    per_token = multiply_adds_per_token(loaded.model.dims)
    with torch.no_grad():
        with threads_for(len(ids) * per_token):
            logits, cache = loaded.model.forward(ids, last_only=True)
        for _ in range(options.max_tokens - len(ids)):
            token = sample(logits[-1], options, generator)
            if token in loaded.stop_ids:
                return token
            yield token
            with threads_for(per_token):
                logits, cache = loaded.model.forward([token], cache)
    return None


def check_memory(dims: Dims, options: Options, prompt_tokens: int) -> None:
    """Refuse a KV cache and prompt that would not fit in the memory left, before allocating them."""
    free = available_bytes()
    need = generation_bytes(dims, options.max_tokens, prompt_tokens)
    if free is None or need <= free:
        return
    most = bisect.bisect_right(range(options.max_tokens), free, key=lambda n: generation_bytes(dims, n, prompt_tokens)) - 1
    hint = f"use at most --max-tokens {most}" if most > prompt_tokens else "the prompt alone does not fit"
    raise ConversionError(f"--max-tokens {options.max_tokens}: the KV cache and attention for a {prompt_tokens}-token "
                          f"prompt need about {size_text(need)}, only {size_text(free)} of memory is free; {hint}")


def multiply_adds_per_token(dims: Dims) -> int:
    """About how many multiply-adds one token costs: attention and MLP projections, logits."""
    projections = dims.hidden_size * (2 * dims.q_size + 2 * dims.kv_size + 3 * dims.intermediate_size)
    return dims.num_layers * projections + dims.vocab_size * dims.hidden_size


@dataclass(frozen=True)
class Generation:
    ids: list[int]
    text: str
    seconds: float
    stop_id: int | None = None  # the stop token that ended it (not in `ids`); None: the KV cache filled, or unknown

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds else 0.0


OnToken = Callable[[int, str], object]


def generate(loaded: LoadedModel, prompt: str, options: Options, on_text=None,
             on_token: OnToken | None = None) -> Generation:
    """Generate, calling `on_text(piece)` with each new piece of text as it is decoded and
    `on_token(id, piece)` with each generated token and the text it completes ("" while a character's
    bytes are incomplete; the U+FFFD of bytes still incomplete at the end goes to `on_text` only)."""
    ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    tokens = generate_ids(loaded, prompt, options)
    while True:
        try:
            token = next(tokens)
        except StopIteration as end:
            stop_id = end.value
            break
        ids.append(token)
        # A character split over byte tokens decodes as U+FFFD until its last byte arrives: hold it back.
        before = shown
        shown = _show(decode(loaded, ids).rstrip(UNFINISHED), shown, on_text)
        if on_token:
            on_token(token, shown[len(before):])
    text = decode(loaded, ids)
    _show(text, shown, on_text)
    return Generation(ids, text, time.perf_counter() - start, stop_id)


UNFINISHED = "\ufffd"  # what SentencePiece decodes an incomplete or invalid UTF-8 byte sequence to


def decode(loaded: LoadedModel | Vocabulary, ids: list[int]) -> str:
    """The text of generated ids; ids past the tokenizer's pieces (embedding rows no piece names,
    such as Gemma 3's image tokens) have none."""
    size = loaded.tokenizer.get_piece_size()
    text = loaded.tokenizer.decode([i for i in ids if i < size])
    return text.replace(BYTE_LEVEL_SPACE, " ") if loaded.byte_level else text


def _show(text: str, shown: str, on_text) -> str:
    """Pass what `text` adds to the `shown` text to `on_text`; returns what is shown now."""
    if not text.startswith(shown):
        return shown
    if on_text and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
