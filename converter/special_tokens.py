"""The checkpoint's own start and stop tokens against the model type's defaults in LlmParameters.

A fine-tune may add tokens (ChatML's `<|im_start|>`/`<|im_end|>` on Gemma) and name them in
`generation_config.json` / `config.json` (`bos_token_id`, `eos_token_id`: an id or a list) or
`tokenizer_config.json` (`bos_token`, `eos_token`: a string or `{"content": ...}`). A claimed
token that is a special piece of the tokenizer (control or user-defined) is used: it becomes the
start token, or joins the stop tokens. One that is an ordinary piece is only reported, since real
configs carry stale ids (falcon-rw-1b says eos 2, a plain piece, where its runtime stops at
`<|endoftext|>`). Checkpoints that agree with the defaults are written exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb

from .errors import ConversionError
from .files import read_json_object
from .models.values import shown
from .proto import llm_params_pb2

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL = (spm_pb.ModelProto.SentencePiece.CONTROL, spm_pb.ModelProto.SentencePiece.USER_DEFINED)


@dataclass(frozen=True)
class Claim:
    """A token id the checkpoint names as its start (`bos`) or stop (`eos`) token, and where."""

    kind: str
    token_id: int
    where: str


def _ids(settings: dict, key: str, kind: str, file: str, vocab_size: int) -> list[Claim]:
    value = settings.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    for item in values:
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < vocab_size:
            raise ConversionError(f"{file}: {key} must be a token id below the vocabulary size {vocab_size} "
                                  f"(or a list of them), got {shown(value)}")
    return [Claim(kind, item, f"{file} {key}") for item in values]


def _named(settings: dict, key: str, kind: str, file: str, pieces: list[str]) -> list[Claim]:
    value = settings.get(key)
    content = value.get("content") if isinstance(value, dict) else value
    if content is None:
        return []
    if not isinstance(content, str):
        raise ConversionError(f"{file}: {key} must be a string or an object with a string content, got {shown(value)}")
    return [Claim(kind, pieces.index(content), f"{file} {key}")] if content in pieces else []


def claims(folder: Path, config: dict, pieces: list[str], vocab_size: int) -> list[Claim]:
    """Every start/stop token the checkpoint folder names, most authoritative first."""
    found: list[Claim] = []
    generation = folder / GENERATION_CONFIG
    for file, settings in ((GENERATION_CONFIG, read_json_object(generation) if generation.is_file() else {}),
                           ("config.json", config)):
        for kind in ("bos", "eos"):
            found += _ids(settings, f"{kind}_token_id", kind, file, vocab_size)
    tokenizer_config = folder / TOKENIZER_CONFIG
    if tokenizer_config.is_file():
        settings = read_json_object(tokenizer_config)
        for kind in ("bos", "eos"):
            found += _named(settings, f"{kind}_token", kind, TOKENIZER_CONFIG, pieces)
    return found


def apply_special_tokens(params: llm_params_pb2.LlmParameters, folder: Path, config: dict, tokenizer: bytes,
                         model_type: str) -> list[str]:
    """Set the checkpoint's special start/stop tokens in `params`; returns `note:`/`warning:` lines."""
    proto = spm_pb.ModelProto.FromString(tokenizer)
    pieces = [piece.piece for piece in proto.pieces]
    messages: list[str] = []
    default_start = params.start_token_id
    default_stops = list(params.stop_tokens)

    def name(token_id: int) -> str:
        return f"{pieces[token_id]!r} (id {token_id})" if token_id < len(pieces) else f"id {token_id}"

    def special(token_id: int) -> bool:
        return token_id < len(pieces) and proto.pieces[token_id].type in SPECIAL

    found = claims(folder, config, pieces, params.vocab_size)
    start = next((c for c in found if c.kind == "bos" and special(c.token_id)), None)
    if start is not None and start.token_id != default_start:
        params.start_token_id = start.token_id
        messages.append(f"note: start token {name(start.token_id)} from {start.where}, instead of "
                        f"{model_type}'s {name(default_start)}")
    for claim in found:
        if claim.kind == "bos" and claim.token_id != params.start_token_id:
            messages.append(f"warning: {claim.where} names {name(claim.token_id)} as the start token; "
                            f"using {name(params.start_token_id)}")
        elif claim.kind == "eos" and (claim.token_id >= len(pieces) or pieces[claim.token_id] not in params.stop_tokens):
            if special(claim.token_id):
                params.stop_tokens.append(pieces[claim.token_id])
                messages.append(f"note: stop token {name(claim.token_id)} from {claim.where}, besides "
                                f"{model_type}'s {', '.join(default_stops)}")
            else:
                messages.append(f"warning: {claim.where} names {name(claim.token_id)} as a stop token, not a "
                                f"special piece of the tokenizer; stopping at {', '.join(params.stop_tokens)} only")
    return list(dict.fromkeys(messages))
