"""Prompts `lora-run` takes, checked before anything is loaded, and text
output that survives any terminal encoding."""
from __future__ import annotations

import io
import sys

from converter.errors import ConversionError


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
