"""The package's output folder: file names every platform can carry, and a folder built beside
the target and renamed into place, so a failed or interrupted run leaves no half package."""
from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from converter.errors import ConversionError
from converter.files import check_name_lengths, read_json_object, report_partial, signals_held

NAME_MAX = 255  # bytes in a file name (ext4, APFS, zip tools)
# Control characters, and what Windows, FAT (Android's shared storage) or zip tools cannot hold.
UNSAFE_CHARACTERS = re.compile(r'[\x00-\x1f\x7f<>:"|?*\\/]')
MANIFEST = "manifest.json"
MANIFEST_PLACES = (f"*/{MANIFEST}", f"*/src/main/assets/{MANIFEST}")


def check_file_name(path: Path, option: str) -> None:
    """A name that goes unchanged into the app, the manifests and adb_push.sh. A leading '.' is
    refused because Android's asset packaging skips such files, a leading '-' because tools
    read it as an option."""
    name = path.name
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConversionError(f"{option} {str(path)!r}: the file name is not valid UTF-8; rename the file") from None
    if size > NAME_MAX or name.startswith(("-", ".")) or name.endswith(("~", " ", ".")) \
            or UNSAFE_CHARACTERS.search(name):
        raise ConversionError(f"{option} {str(path)!r}: rename the file; an app package takes no name that starts with "
                              "'-' or '.', ends with '~', '.' or a space, holds a control character or any of "
                              f"<>:\"|?*\\, or is longer than {NAME_MAX} bytes")


def check_distinct(named: list[tuple[str, Path]], reserved: list[str]) -> None:
    """No two inputs, and no input and a file the package writes beside them, share a name
    (compared without case, as on macOS and Windows file systems)."""
    taken = {name.casefold(): f"the package's own {name}" for name in reserved}
    for option, path in named:
        other = taken.setdefault(path.name.casefold(), f"{option} {path}")
        if other != f"{option} {path}":
            raise ConversionError(f"{option} {path} would land on the same file as {other}; rename it")


def previous_package(folder: Path) -> bool:
    """Whether `folder` holds a package this command wrote (one of its manifests)."""
    for manifest in (m for pattern in MANIFEST_PLACES for m in folder.glob(pattern)):
        try:
            if "format_version" in read_json_object(manifest):
                return True
        except ConversionError:
            continue
    return False


def check_output_folder(output: Path, inputs: list[tuple[str, Path]]) -> Path:
    """`--output` resolved: a folder to create, an empty one, or an earlier package (replaced as a
    whole, so it must not hold an input)."""
    resolved = check_name_lengths(output, "--output").resolve()
    if resolved == resolved.parent:
        raise ConversionError(f"--output {output}: give a folder to create")
    ancestor = resolved
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"--output {output}: {ancestor} is a file, not a folder")
    for option, path in inputs:
        if resolved in path.resolve().parents:
            raise ConversionError(f"--output {output} holds the input {option} {path} and would be replaced as a whole; "
                                  "choose another folder")
    try:
        foreign = ancestor == resolved and any(resolved.iterdir()) and not previous_package(resolved)
    except OSError as exc:
        raise ConversionError(f"--output {output}: cannot read ({exc.strerror})") from None
    if foreign:
        raise ConversionError(f"--output {output} is a folder with other files; give a new or empty folder (an "
                              "earlier package is replaced)")
    return resolved


def new_folder(beside: Path, suffix: str) -> Path:
    """A new empty folder next to `beside` (with the umask's permissions, unlike mkdtemp's 0700)."""
    while True:
        folder = beside.with_name(f".{beside.name[:100]}.{secrets.token_hex(4)}{suffix}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


@contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A new folder beside `output` to fill; when the block succeeds it takes the place of
    `output` (an earlier one is removed), on any failure or signal it is deleted. Signals are held
    while the folder is made and recorded and while the folders are swapped, so a signal never
    lands between a step and its cleanup."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"--output {output}: cannot create ({exc.strerror})") from None
    stage: Path | None = None
    try:
        with signals_held():
            stage = new_folder(output, ".partial")
            report_partial(stage)
        yield stage
        with signals_held():
            if output.exists():
                old = new_folder(output, ".old")
                os.replace(output, old)
                try:
                    os.replace(stage, output)
                except BaseException:
                    os.replace(old, output)
                    raise
                stage = None
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, output)
                stage = None
    except BaseException as exc:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ConversionError(f"--output {output}: cannot write ({exc.strerror})") from None
        raise
