"""Loading a SentencePiece tokenizer file with user-facing errors."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import ConversionError


def load_tokenizer(path: Path, option: str) -> tuple[bytes, spm.SentencePieceProcessor]:
    """The file's bytes and the loaded processor; errors name `option` and the path."""
    if path.is_dir():
        raise ConversionError(f"{option} {path} is a folder; expected a SentencePiece .model file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConversionError(f"{option} {path}: cannot read ({exc.strerror})") from None
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError):
        raise ConversionError(f"{option} {path}: not a valid SentencePiece model") from None
    return data, processor
