"""config.json checks for settings the runtime fixes per model type instead of reading them."""
from __future__ import annotations

import math

from ..errors import ConversionError
from .values import mapping, shown


def setting(config: dict, key: str, default):
    """A config value at the top level (transformers 4) or in `rope_parameters` (transformers 5)."""
    if config.get(key) is not None:
        return config[key]
    return mapping(config, "rope_parameters").get(key, default)


def require(config: dict, key: str, allowed: tuple, default) -> None:
    """Refuse a config whose `key` (or `default` when absent) is not one of `allowed`; no config, no check."""
    if not config:
        return
    value = setting(config, key, default)
    if value not in allowed:
        raise ConversionError(f"config.json: {key} {shown(value)} is not supported (the runtime uses {allowed[0]!r})")


def require_close(config: dict, key: str, expected: float, default: float | None = None) -> None:
    """Refuse a config whose float `key` (or `default` when absent) differs from what the runtime uses."""
    if not config:
        return
    value = setting(config, key, expected if default is None else default)
    if not isinstance(value, (int, float)) or not math.isclose(value, expected, rel_tol=1e-6):
        raise ConversionError(f"config.json: {key} {shown(value)} is not supported (the runtime uses {expected})")
