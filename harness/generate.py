"""Text generation over the reference runtime, with MediaPipe LLM Inference's options.

`max_tokens` is the KV-cache size (start token + prompt + output) as in MediaPipe; sampling is
top-k with temperature (greedy when temperature is 0 or top-k is 1), seeded by `random_seed`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sentencepiece as spm
import torch

from bundler.task import TOKENIZER_ENTRY, open_weights
from converter.errors import ConversionError
from converter.files import regular_file
from converter.hf_tokenizer import is_converted_hf_tokenizer
from converter.models.base import Dims
from converter.runtime_options import RuntimeOptions as Options
from converter.tflite import SPM_VOCAB_MODEL, WeightFile
from converter.tokenizer import load_tokenizer

from .linear import threads_for
from .reference import ReferenceModel


@dataclass
class LoadedModel:
    model: ReferenceModel
    tokenizer: spm.SentencePieceProcessor
    start_id: int
    stop_ids: set[int]
    byte_level: bool = False  # a Hugging Face BPE vocabulary: spaces are "Ġ" pieces (see `runtime_text`)


BYTE_LEVEL_SPACE = "\u0120"  # "Ġ", GPT-2 byte-level BPE's space


def runtime_text(loaded: LoadedModel, prompt: str) -> str:
    """The prompt as the runtime tokenizes it: with a byte-level BPE vocabulary it writes each space
    as "Ġ" (observed in the web runtime with FALCON_RW_1B; other bytes' mapping is unobserved)."""
    return prompt.replace(" ", BYTE_LEVEL_SPACE) if loaded.byte_level else prompt


def load(model_path: Path, lora_path: Path | None = None, tokenizer_path: Path | None = None) -> LoadedModel:
    """A .bin (tokenizer embedded or given) or a .task (tokenizer and tokens from the bundle); a given
    tokenizer is a SentencePiece file or a Hugging Face tokenizer folder (converted as lora-convert does)."""
    weights, task = open_weights(Path(model_path), "--model")
    given = load_tokenizer(Path(tokenizer_path), "--tokenizer")[0] if tokenizer_path else None
    tokenizer = spm.SentencePieceProcessor()
    if task is not None:
        blob = given or task.read(TOKENIZER_ENTRY)
        tokenizer.LoadFromSerializedProto(blob)
        metadata = task.metadata()
        start_id = tokenizer.piece_to_id(metadata.start_token)
        stops = list(metadata.stop_tokens)
    else:
        blob = given or weights.metadata.get(SPM_VOCAB_MODEL)
        if not blob:
            raise ConversionError(f"{model_path} has no embedded tokenizer; pass --tokenizer")
        tokenizer.LoadFromSerializedProto(blob)
        params = weights.parameters
        start_id = params.start_token_id if params.HasField("start_token_id") else tokenizer.piece_to_id(params.start_token)
        stops = list(params.stop_tokens)
    lora = WeightFile(regular_file(lora_path, "--lora")) if lora_path else None
    return LoadedModel(ReferenceModel(weights, lora), tokenizer, start_id, {tokenizer.piece_to_id(s) for s in stops},
                       is_converted_hf_tokenizer(blob))


def sample(logits: torch.Tensor, options: Options, generator: torch.Generator) -> int:
    if options.temperature <= 0 or options.top_k == 1:
        return int(logits.argmax())
    values, indices = logits.topk(min(options.top_k, logits.numel()))
    probabilities = torch.softmax(values / options.temperature, -1)
    return int(indices[torch.multinomial(probabilities, 1, generator=generator)])


def prompt_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    """The start token and the prompt's tokens, as the runtime feeds them."""
    return [loaded.start_id] + loaded.tokenizer.encode(runtime_text(loaded, prompt))


def generate_ids(loaded: LoadedModel, prompt: str, options: Options) -> Iterator[int]:
    """Token ids as they are generated, until a stop token or the KV cache is full."""
    ids = prompt_ids(loaded, prompt)
    if len(ids) >= options.max_tokens:
        raise ConversionError(f"the prompt takes {len(ids)} tokens; --max-tokens {options.max_tokens} leaves no room")
    generator = torch.Generator().manual_seed(options.random_seed)
    per_token = multiply_adds_per_token(loaded.model.dims)
    with torch.no_grad():
        with threads_for(len(ids) * per_token):
            logits, cache = loaded.model.forward(ids, last_only=True)
        for _ in range(options.max_tokens - len(ids)):
            token = sample(logits[-1], options, generator)
            if token in loaded.stop_ids:
                return
            yield token
            with threads_for(per_token):
                logits, cache = loaded.model.forward([token], cache)


def multiply_adds_per_token(dims: Dims) -> int:
    """About how many multiply-adds one token costs: attention and MLP projections, logits."""
    projections = dims.hidden_size * (2 * dims.q_size + 2 * dims.kv_size + 3 * dims.intermediate_size)
    return dims.num_layers * projections + dims.vocab_size * dims.hidden_size


@dataclass(frozen=True)
class Generation:
    ids: list[int]
    text: str
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds else 0.0


def generate(loaded: LoadedModel, prompt: str, options: Options, on_text=None) -> Generation:
    """Generate, calling `on_text(piece)` with each new piece of text as it is decoded."""
    ids: list[int] = []
    text = ""
    start = time.perf_counter()
    for token in generate_ids(loaded, prompt, options):
        ids.append(token)
        decoded = loaded.tokenizer.decode(ids)
        if loaded.byte_level:
            decoded = decoded.replace(BYTE_LEVEL_SPACE, " ")
        if on_text and decoded.startswith(text):
            on_text(decoded[len(text):])
        text = decoded
    return Generation(ids, text, time.perf_counter() - start)
