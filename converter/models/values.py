"""Typed reads of config.json values: every family reads its settings through these, so a null,
string, list or absurd number is one line naming the file and key, never a traceback or a NaN."""
from __future__ import annotations

import math
from typing import Any

from ..errors import ConversionError

SOURCE = "config.json"
REQUIRED: Any = object()  # `default` for a key that must be present


def shown(value: Any) -> str:
    """A value for an error line, cut short (a hostile config may nest deeply)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value(config: dict, key: str, default: Any, expected: str, source: str) -> Any:
    value = config.get(key, default)
    if value is REQUIRED:
        raise ConversionError(f"{source}: missing {key} ({expected})")
    return value


def integer(config: dict, key: str, default: Any = REQUIRED, *, low: int = 1, high: int = 2**31 - 1,
            source: str = SOURCE) -> int:
    """An integer in [low, high] (bools and floats refused); `default` when the key is absent."""
    expected = f"an integer from {low} to {high}"
    value = _value(config, key, default, expected, source)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConversionError(f"{source}: {key} must be {expected}, got {shown(value)}")
    return value


def number(config: dict, key: str, default: Any = REQUIRED, *, low: float = 0.0, high: float = math.inf,
           above_low: bool = False, source: str = SOURCE) -> float:
    """A finite number in [low, high] (or (low, high] with `above_low`); `default` when absent."""
    expected = f"a finite number {'above' if above_low else 'of at least'} {low:g}" + (
        f" and at most {high:g}" if high != math.inf else "")
    value = _value(config, key, default, expected, source)
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < low or (above_low and value == low) or value > high):
        raise ConversionError(f"{source}: {key} must be {expected}, got {shown(value)}")
    return float(value)


def optional_number(config: dict, key: str, default: Any, **limits: Any) -> float | None:
    """`number`, with null meaning "not set" (None)."""
    return None if config.get(key, default) is None else number(config, key, default, **limits)


def _of_type(config: dict, key: str, default: Any, kind: type, expected: str, source: str) -> Any:
    """The value at `key` if it is a `kind`; null or absent gives `default`."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ConversionError(f"{source}: {key} must be {expected}, got {shown(value)}")
    return value


def flag(config: dict, key: str, default: bool, *, source: str = SOURCE) -> bool:
    """A boolean; null counts as the default."""
    return _of_type(config, key, default, bool, "true or false", source)


def text(config: dict, key: str, default: str, *, source: str = SOURCE) -> str:
    """A string; null counts as the default."""
    return _of_type(config, key, default, str, "a string", source)


def mapping(config: dict, key: str, *, source: str = SOURCE) -> dict:
    """A JSON object; absent or null is an empty one."""
    return _of_type(config, key, {}, dict, "a JSON object", source)


def strings(config: dict, key: str, *, source: str = SOURCE) -> list[str] | None:
    """A list of strings, or None when absent or null."""
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConversionError(f"{source}: {key} must be a list of strings, got {shown(value)}")
    return value
