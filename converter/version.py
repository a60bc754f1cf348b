"""The package version every tool's `--version` prints."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import click

DISTRIBUTION = "lora-convert"


def package_version() -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject.toml's."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    except OSError:
        return "unknown"
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else "unknown"


def version_option(prog_name: str):
    """`--version`: prints `<prog_name> <version>` and exits."""
    return click.version_option(package_version(), "--version", prog_name=prog_name, message="%(prog)s %(version)s")
