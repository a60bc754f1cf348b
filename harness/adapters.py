"""Names of the LoRA adapters `lora-run` loads on one base: `--lora [NAME=]PATH`, the name rule,
and `base` for none. Light (no torch), so the command line is checked before anything loads."""
from __future__ import annotations

from pathlib import Path

from bundler.package import NAME, NAME_RULE, parse_lora
from converter.errors import ConversionError
from converter.files import regular_file

BASE = "base"  # the adapter name that selects none: the base model alone


def check_adapter_name(name: str, path: Path, taken: list[str]) -> None:
    """A name an adapter can be chosen by: the app-package rule of `lora-bundle package`, not `base`,
    not taken already."""
    if not NAME.fullmatch(name):
        raise ConversionError(f"--lora name {name!r} (of {path}): {NAME_RULE}; give NAME=PATH to choose one")
    if name == BASE:
        raise ConversionError(f"--lora name {BASE!r} (of {path}) means the base model without adapter; "
                              "give NAME=PATH to choose another")
    if name in taken:
        raise ConversionError(f"--lora name {name!r} (of {path}) is given twice; names must be unique")


def named_adapters(values: list[str] | tuple[str, ...]) -> list[tuple[str, Path]]:
    """Repeated `--lora [NAME=]PATH` values (a bare PATH is named after its file, as `lora-bundle
    package` does) as checked (name, path) pairs, the files checked to exist: before anything loads."""
    named: list[tuple[str, Path]] = []
    for value in values:
        name, path = parse_lora(value)
        if len(values) == 1 and "=" not in value and (name == BASE or not NAME.fullmatch(name)):
            name = "adapter"  # a lone adapter is never chosen by name, so its file name may be anything
        check_adapter_name(name, path, [taken for taken, _ in named])
        named.append((name, regular_file(path, "--lora")))
    return named


def unknown_adapter(name: str, adapters: list[str]) -> str:
    given = ", ".join(adapters) if adapters else "none"
    return f"no adapter named {name!r} (adapters: {given}; {BASE!r} for the base model)"
