"""Checks on what a user hands `lora-run` and `scripts/web_run.py`, made before anything is loaded,
and text output that survives any terminal encoding."""
from __future__ import annotations

import io
import sys
from pathlib import Path

from converter.errors import ConversionError


def input_path(path: Path, option: str, folder: bool = False) -> Path:
    """`path` if it is a regular file (or, with `folder`, a directory): a FIFO or a device would
    block or never end when read."""
    path = Path(path)
    if path.is_file() or (folder and path.is_dir()):
        return path
    if not path.exists():
        raise ConversionError(f"{option} {path}: file not found")
    expected = "a regular file or a folder" if folder else "a regular file"
    raise ConversionError(f"{option} {path}: not {expected}")


def check_prompt(prompt: str, option: str = "--prompt") -> str:
    """The prompt if it is valid UTF-8 text (the runtimes take UTF-8); bytes that are not, which
    Python keeps from the command line as lone surrogates, are refused by position."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        character = prompt[exc.start]
        what = f"byte 0x{ord(character) - 0xDC00:02x}" if 0xDC80 <= ord(character) <= 0xDCFF \
            else f"lone surrogate U+{ord(character):04X}"
        raise ConversionError(f"{option} is not valid UTF-8 text ({what} at character {exc.start})") from None
    return prompt


def tolerant_stdout() -> None:
    """Let stdout print any text: characters its encoding lacks (an ASCII locale) come out as
    backslash escapes instead of raising UnicodeEncodeError."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
