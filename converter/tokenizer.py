"""Loading a tokenizer (a SentencePiece file or a Hugging Face BPE folder) with user-facing errors."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import ConversionError
from .files import read_bounded
from .hf_tokenizer import convert_hf_tokenizer

MAX_TOKENIZER_BYTES = 256 << 20  # SentencePiece models are a few MB (Gemma 3's: 4.7 MB)


def load_tokenizer(path: Path, option: str) -> tuple[bytes, spm.SentencePieceProcessor]:
    """The SentencePiece model bytes and the loaded processor; errors name `option` and the path.

    A folder is a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json), converted as
    MediaPipe's converter does (see converter/hf_tokenizer.py)."""
    if path.is_dir():
        data = convert_hf_tokenizer(path, option)
    else:
        data = read_bounded(path, option, MAX_TOKENIZER_BYTES)
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError):
        raise ConversionError(f"{option} {path}: not a valid SentencePiece model") from None
    return data, processor
