"""Loading a tokenizer (a SentencePiece file or a Hugging Face BPE folder) with user-facing errors."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import ConversionError
from .files import read_bounded
from .hf_tokenizer import convert_hf_tokenizer, is_converted_hf_tokenizer

MAX_TOKENIZER_BYTES = 256 << 20  # SentencePiece models are a few MB (Gemma 3's: 4.7 MB)


def load_tokenizer(path: Path, option: str) -> tuple[bytes, spm.SentencePieceProcessor]:
    """The SentencePiece model bytes and the loaded processor; errors name `option` and the path.

    A folder is a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json), converted as
    MediaPipe's converter does (see converter/hf_tokenizer.py)."""
    if path.is_dir():
        data = convert_hf_tokenizer(path, option)
    else:
        data = read_bounded(path, option, MAX_TOKENIZER_BYTES)
    return data, parse_sentencepiece(data, f"{option} {path}")


def parse_sentencepiece(data: bytes, where: str) -> spm.SentencePieceProcessor:
    """The processor for a serialized SentencePiece model; `where` names its file (and entry) in
    the error. sentencepiece raises RuntimeError, OSError or, for some corrupt bytes, a
    UnicodeDecodeError."""
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError, ValueError):
        raise ConversionError(f"{where}: not a valid SentencePiece model") from None
    return processor


def check_tokenizer_size(data: bytes, pieces: int, vocab_size: int, untokenized_rows: int, what: str,
                         model: str) -> None:
    """The one rule for a tokenizer and a model (converter and bundler alike): as many pieces as
    embedding rows, or fewer by the family's `untokenized_rows` (Gemma 3 4B and up: 64 image-token
    rows), or at most the rows for a Hugging Face byte-level BPE vocabulary (checkpoints pad their
    embedding past it: Phi-2 has 51200 rows for 50295 pieces). `what` names the tokenizer
    (option and path), `model` the model in the error line."""
    sizes = {vocab_size, vocab_size - untokenized_rows}
    if pieces in sizes or (pieces <= vocab_size and is_converted_hf_tokenizer(data)):
        return
    expected = " or ".join(str(size) for size in sorted(sizes, reverse=True))
    raise ConversionError(f"{what} has {pieces} pieces but {model} has a vocabulary of {vocab_size} embedding rows; "
                          f"expected a tokenizer of {expected} pieces")
