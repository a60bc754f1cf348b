"""File helpers: JSON objects in, atomic output (temporary name, renamed when complete) out."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import ConversionError


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, adapter_config.json)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Yield a new file opened for writing; on success it replaces `path` (with the usual
    umask permissions), on any exception it is deleted, so no partial file is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as handle:
            yield handle
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
