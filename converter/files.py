"""File helpers: inputs checked before they are opened, output paths checked before anything is
written, bounded reads, JSON objects in, atomic output (temporary name, renamed when complete) out."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from .errors import ConversionError

MAX_JSON_BYTES = 64 << 20  # config.json, adapter_config.json, tokenizer.json, shard indexes
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the ones the supervisor turns into cleanup
NAME_MAX = 255  # bytes in one path component (Linux, macOS)
KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
_partials_fd: int | None = None  # where temporary names are reported (the supervisor's pipe)
_groups: list["OutputGroup"] = []  # the open output groups, innermost last
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing the range's dirty pages, do not wait
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)  # Linux only
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _named(path: Path | str, option: str | None) -> str:
    return f"{option} {path}" if option else str(path)


def _kind(mode: int) -> str:
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def check_input(path: Path | str, option: str | None = None, folder: bool = False) -> Path:
    """`path` as given for `option`: a regular file (or, with `folder`, a folder), checked with
    stat so a FIFO is never opened (which would hang) and a device never read (/dev/zero).
    A path that does not exist is returned as is, for the caller's own message (globs)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise ConversionError(f"{_named(path, option)}: cannot read ({exc.strerror})") from None
    if stat.S_ISREG(mode) or (folder and stat.S_ISDIR(mode)):
        return path
    expected = "a regular file or a folder" if folder else "a regular file"
    raise ConversionError(f"{_named(path, option)} is {_kind(mode)}; expected {expected}")


def regular_file(path: Path | str, option: str | None = None) -> Path:
    """The regular file given as `option`; a missing path is refused too."""
    path = check_input(path, option)
    if not path.is_file():
        raise ConversionError(f"{_named(path, option)}: file not found")
    return path


def read_bounded(path: Path | str, option: str | None, limit: int) -> bytes:
    """The bytes of the regular file given as `option`, refused when larger than `limit`."""
    path = regular_file(path, option)
    try:
        # O_NONBLOCK: a FIFO swapped in after the check opens at once, and fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConversionError(f"{_named(path, option)} is {_kind(mode)}; expected a regular file")
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConversionError(f"{_named(path, option)}: cannot read ({exc.strerror})") from None
    if len(data) > limit:
        bound = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
        raise ConversionError(f"{_named(path, option)}: larger than {bound}, the most read for it")
    return data


def read_json_object(path: Path, option: str | None = None) -> dict:
    """A JSON file that must hold an object (config.json, adapter_config.json), at most 64 MiB."""
    return json_object(read_bounded(path, option, MAX_JSON_BYTES), path, option)


def json_object(data: bytes, path: Path, option: str | None = None) -> dict:
    """`data` (the bytes of `path`) parsed as a JSON object; errors name the option and the file."""
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise ConversionError(f"{_named(path, option)}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConversionError(f"{_named(path, option)}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{_named(path, option)}: expected a JSON object")
    return config


def input_files(path: Path | str) -> list[Path]:
    """The files an input stands for: a folder's files, a glob's matches, or the file itself."""
    path = Path(path)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    if path.exists():
        return [path]
    from glob import glob

    return [Path(p) for p in glob(str(path)) if os.path.isfile(p)]


def _identity(path: Path) -> tuple[int, int] | Path:
    """What makes two paths the same file: device and inode when it exists (hard and symbolic
    links included), else the resolved path."""
    try:
        info = path.stat()
    except OSError:
        return path.resolve()
    return info.st_dev, info.st_ino


def refuse_overwrite(outputs: Iterable[tuple[str, Path]], inputs: Iterable[tuple[str, Path | str | None]]) -> None:
    """Refuse an output that is one of the inputs' files (the same path, a symbolic or hard link)
    or the same file as another output. Inputs may be files, folders (all their files) or globs."""
    seen: dict[tuple[int, int] | Path, str] = {}
    for option, given in inputs:
        if given is None:
            continue
        for file in input_files(given):
            identity = _identity(file)
            if identity not in seen or file == Path(given):  # a file named by its option names it best
                seen[identity] = f"{option} ({file})"
    used: dict[tuple[int, int] | Path, str] = {}
    for option, path in outputs:
        identity = _identity(Path(path))
        if identity in seen:
            raise ConversionError(f"{option} {path} is the same file as the input {seen[identity]}; refusing to "
                                  "overwrite an input: choose another output path")
        if identity in used:
            raise ConversionError(f"{option} {path} is the same file as {used[identity]}; "
                                  "give each output its own path")
        used[identity] = f"{option} {path}"


def check_name_lengths(path: Path | str, option: str) -> Path:
    """An output path none of whose names is too long for the file system (ENAMETOOLONG)."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConversionError(f"{option} {path}: the name {part[:40]}... is longer than {NAME_MAX} bytes")
    return path


def check_output(path: Path | str, option: str) -> Path:
    """An output file path that can be created: no name too long, no existing folder or device in
    its place, and a folder (existing or to be made) above it. Nothing is created."""
    path = check_name_lengths(path, option)
    if path.exists():  # a dangling symbolic link is fine: the new file replaces the link
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConversionError(f"{option} {path}: cannot use as output ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            raise ConversionError(f"{option} {path} is {_kind(mode)}; expected a file name to write")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"{option} {path}: cannot write in {parent} ({os.strerror(errno.EACCES)})")
    return path


def current_umask() -> int:
    """The process umask, read without changing it (os.umask sets it, which races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def report_partials(fd: int | None) -> None:
    """Send every temporary output name to `fd` as it is created, NUL-terminated (see supervisor)."""
    global _partials_fd
    _partials_fd = fd


def report_partial(path: str | Path) -> None:
    """Tell the supervisor about a temporary file or folder, so it is removed if the run is killed."""
    if _partials_fd is not None:
        os.write(_partials_fd, os.fsencode(path) + b"\0")


def _temp_name(path: Path) -> str:
    """A prefix for the temporary file beside `path` that keeps within NAME_MAX."""
    return f".{os.fsdecode(os.fsencode(path.name)[:NAME_MAX - 40])}."


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is synced
    finally:
        os.close(fd)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of `data` (C-contiguous bytes or array) at `offset` of `fd`: `os.pwrite` may write
    fewer bytes than asked."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing bytes [offset, offset + length) of `fd` to disk now, without waiting (Linux;
    elsewhere nothing). A file written in parts this way, each part once it is complete, is
    mostly on disk when `atomic_output` syncs it, so the disk works while the caller computes
    the next part instead of after the last one."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # advisory: errors show at the fsync


def _created_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; returns those it made, innermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
    return missing


class OutputGroup:
    """The files completed by `atomic_output` while the group is open."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def discard(self) -> None:
        """Remove the files the group completed (a failed run's finished parts)."""
        for path in self.paths:
            if path.is_file():
                path.unlink()
        self.paths.clear()


@contextmanager
def output_group() -> Iterator[OutputGroup]:
    """Collect the files written inside the block, so a run that fails can remove them."""
    group = OutputGroup()
    _groups.append(group)
    try:
        yield group
    finally:
        _groups.remove(group)


@contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT, SIGTERM and SIGHUP over a few bookkeeping steps (main thread), so a signal
    cannot land between creating a temporary file and recording it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextmanager
def atomic_output(path: Path, option: str | None = None) -> Iterator[BinaryIO]:
    """Yield a new file opened for writing, beside `path`; on success it is synced and renamed
    over `path` (with the usual umask permissions). On any exception, signals included, it is
    deleted, so no partial file is ever left; an OSError (disk full, ...) becomes one line."""
    path = Path(path)
    label = _named(path, option)
    made: list[Path] = []
    temp = None
    try:
        with signals_held():  # the temporary file exists exactly while `temp` names it
            made = _created_folders(path.parent)
            fd, temp = tempfile.mkstemp(prefix=_temp_name(path), suffix=".partial", dir=path.parent)
            report_partial(temp)
        with os.fdopen(fd, "w+b") as handle:
            yield handle
            handle.flush()
            # Kept although a rename alone already covers interrupts: after a power loss the renamed
            # file could hold zeros where its data never reached the disk, and still load. Writers
            # that start_writeback each part as it completes leave this little to wait for (GEMMA_2B
            # int8: 0.1 s instead of 4-6 s after the last write on the 2-core test machine).
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~current_umask())
        with signals_held():
            os.replace(temp, path)
            temp = None
            for group in _groups:
                group.paths.append(path)
        _fsync_folder(path.parent)
    except OSError as exc:
        cleanup(temp, made)
        raise ConversionError(f"{label}: cannot write ({_reason(exc, path)})") from None
    except BaseException:
        cleanup(temp, made)
        raise


def _reason(exc: OSError, path: Path) -> str:
    """The error, naming its file when that is neither the output nor its temporary file."""
    name = os.fsdecode(exc.filename) if exc.filename is not None else None
    other = name is not None and not name.endswith(".partial") and Path(name) != path
    return f"{exc.strerror or exc}: {name}" if other else str(exc.strerror or exc)


def cleanup(temp: str | None, folders: list[Path]) -> None:
    """Remove a temporary file and the (empty) folders made for it."""
    if temp is not None and os.path.lexists(temp):
        os.unlink(temp)
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break
