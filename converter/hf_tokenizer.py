"""A Hugging Face BPE tokenizer folder as SentencePiece model bytes, as MediaPipe 0.10.21 writes them.

Facts of MediaPipe's `ConvertHfTokenizer` (measured, tests/test_hf_tokenizer.py): the pieces are
`tokenizer.json`'s model vocabulary in id order, scored -id, all NORMAL except the piece named by
`tokenizer_config.json`'s `unk_token` (UNKNOWN); then each added token with `normalized` true, in
the file's order, as USER_DEFINED scored 2**64 (those with `normalized` false, the special tokens
of GPT-2-style tokenizers, are vocabulary pieces already). Merges and byte_fallback are not used.
The model type is BPE and no normalization, whitespace escaping or dummy prefix is applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as spm_pb

from .errors import ConversionError
from .files import MAX_JSON_BYTES, json_object, read_bounded, read_json_object

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
ADDED_TOKEN_SCORE = float(2**64)


def _read_json(path: Path, option: str) -> dict[str, Any]:
    """A JSON object file (`read_json_object`); errors name the option and the file."""
    if not path.is_file():
        raise ConversionError(f"{option} {path.parent}: the folder has no {path.name}; expected a SentencePiece "
                              "model file or a Hugging Face tokenizer folder")
    try:
        return read_json_object(path)
    except ConversionError as exc:
        raise ConversionError(f"{option} {exc}") from None


@dataclass(frozen=True)
class HfTokenizerJson:
    """A Hugging Face tokenizer.json as LiteRT-LM takes it (a .litertlm's HF tokenizer section)."""

    path: Path
    data: bytes  # the file's bytes, as read and checked
    tokens: dict[str, int]  # piece -> id: the model's vocabulary, then the added tokens
    special: frozenset[int]  # the ids of added tokens marked special (<|begin_of_text|>, <|im_end|>)
    size: int  # the highest id + 1

    def check_fits(self, vocab_size: int, option: str, model: str) -> None:
        """Every id must be a row of the model's embedding; fewer ids than rows is fine (checkpoints
        pad their embedding past the tokenizer: Qwen 2.5)."""
        if self.size > vocab_size:
            raise ConversionError(f"{option} {self.path} has token ids up to {self.size - 1} but {model} has a "
                                  f"vocabulary of {vocab_size} embedding rows; expected ids below {vocab_size}")

    def pieces_model(self) -> bytes:
        """SentencePiece ModelProto bytes naming the pieces by id (special added tokens CONTROL, ids
        that name none `<unused_N>`), to read token names and kinds (converter/special_tokens.py);
        SentencePiece itself cannot load them (there is no unknown piece)."""
        names = [f"<unused_{index}>" for index in range(self.size)]
        for piece, index in self.tokens.items():
            names[index] = piece
        proto = spm_pb.ModelProto()
        for index, piece in enumerate(names):
            kind = spm_pb.ModelProto.SentencePiece.CONTROL if index in self.special else spm_pb.ModelProto.SentencePiece.NORMAL
            proto.pieces.add(piece=piece, score=0.0, type=kind)
        proto.trainer_spec.model_type = spm_pb.TrainerSpec.BPE
        proto.normalizer_spec.escape_whitespaces = False
        return proto.SerializeToString()


def is_hf_tokenizer(path: Path) -> bool:
    """A Hugging Face tokenizer given as its folder or as its tokenizer.json (by name)."""
    return path.is_dir() or path.suffix.lower() == ".json"


def read_tokenizer_json(path: Path, option: str) -> HfTokenizerJson:
    """The folder's tokenizer.json (or the .json file itself): at most 64 MiB, a JSON object with a
    BPE model whose ids are 0..N-1 and added tokens with integer ids."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise ConversionError(f"{option} {path}: the folder has no {TOKENIZER_FILE}; expected a Hugging Face "
                              "tokenizer folder or file")
    return parse_tokenizer_json(read_bounded(file, option, MAX_JSON_BYTES), file, option)


def parse_tokenizer_json(data: bytes, file: Path, option: str) -> HfTokenizerJson:
    """`read_tokenizer_json`'s checks on the bytes of `file` (a tokenizer.json, or a .litertlm's section)."""
    tokenizer = json_object(data, file, option)
    tokens = {piece: index for index, piece in enumerate(_vocabulary(tokenizer, file, option))}
    added = tokenizer.get("added_tokens") or []
    if not isinstance(added, list):
        raise ConversionError(f"{option} {file}: added_tokens must be a list")
    special = set()
    for entry in added:
        index = entry.get("id") if isinstance(entry, dict) else None
        if not (isinstance(index, int) and not isinstance(index, bool) and index >= 0
                and isinstance(entry.get("content"), str)):
            raise ConversionError(f"{option} {file}: each added_tokens entry needs a string content and an id >= 0 "
                                  f"({str(entry)[:80]})")
        tokens[entry["content"]] = index
        if entry.get("special") is True:
            special.add(index)
    return HfTokenizerJson(file, data, tokens, frozenset(special), max(tokens.values(), default=-1) + 1)


def _vocabulary(tokenizer: dict[str, Any], path: Path, option: str) -> list[str]:
    """The BPE model's pieces in id order; the ids must be 0..N-1."""
    model = tokenizer.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "BPE":
        raise ConversionError(f"{option} {path}: the tokenizer model is {kind or 'missing'}; expected a BPE model")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise ConversionError(f"{option} {path}: model.vocab must map pieces to integer ids")
    pieces: list[str | None] = [None] * len(vocab)
    for piece, index in vocab.items():
        if not 0 <= index < len(pieces) or pieces[index] is not None:
            raise ConversionError(f"{option} {path}: model.vocab ids must be 0..{len(vocab) - 1}, each once "
                                  f"({piece!r} has id {index})")
        pieces[index] = piece
    return pieces  # type: ignore[return-value]


def _appended_tokens(tokenizer: dict[str, Any], path: Path, option: str) -> list[str]:
    """The added tokens MediaPipe appends: those with `normalized` true, in file order."""
    added = tokenizer.get("added_tokens") or []
    if not isinstance(added, list):
        raise ConversionError(f"{option} {path}: added_tokens must be a list")
    appended = []
    for entry in added:
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)
                and isinstance(entry.get("normalized"), bool)):
            raise ConversionError(f"{option} {path}: each added_tokens entry needs a string content and a "
                                  f"boolean normalized ({entry!r})")
        if entry["normalized"]:
            appended.append(entry["content"])
    return appended


def _unk_token(config: dict[str, Any], path: Path, option: str) -> str:
    unk = config.get("unk_token")
    if not isinstance(unk, str):
        raise ConversionError(f"{option} {path}: unk_token must be a string (MediaPipe requires one), "
                              f"got {'nothing' if unk is None else repr(unk)}")
    return unk


def convert_hf_tokenizer(folder: Path, option: str) -> bytes:
    """SentencePiece model bytes for the folder's tokenizer.json and tokenizer_config.json."""
    tokenizer_path, config_path = folder / TOKENIZER_FILE, folder / CONFIG_FILE
    tokenizer = _read_json(tokenizer_path, option)
    unk = _unk_token(_read_json(config_path, option), config_path, option)
    vocabulary = _vocabulary(tokenizer, tokenizer_path, option)
    appended = _appended_tokens(tokenizer, tokenizer_path, option)
    seen = set(vocabulary)
    for token in appended:
        if token in seen:
            raise ConversionError(f"{option} {tokenizer_path}: added token {token!r} is already a piece; "
                                  "MediaPipe would write it twice and SentencePiece refuses duplicates")
        seen.add(token)
    proto = spm_pb.ModelProto()
    for index, piece in enumerate(vocabulary):
        kind = spm_pb.ModelProto.SentencePiece.UNKNOWN if piece == unk else spm_pb.ModelProto.SentencePiece.NORMAL
        proto.pieces.add(piece=piece, score=float(-index), type=kind)
    for token in appended:
        proto.pieces.add(piece=token, score=ADDED_TOKEN_SCORE, type=spm_pb.ModelProto.SentencePiece.USER_DEFINED)
    proto.trainer_spec.model_type = spm_pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(proto.pieces)
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.add_dummy_prefix = False
        spec.remove_extra_whitespaces = False
        spec.escape_whitespaces = False
    return proto.SerializeToString()


def is_converted_hf_tokenizer(model: bytes) -> bool:
    """Whether SentencePiece model bytes look like a Hugging Face BPE conversion (ours or MediaPipe's):
    a BPE model that leaves whitespace unescaped, which SentencePiece's own trainer never writes."""
    proto = spm_pb.ModelProto.FromString(model)
    return proto.trainer_spec.model_type == spm_pb.TrainerSpec.BPE and not proto.normalizer_spec.escape_whitespaces
