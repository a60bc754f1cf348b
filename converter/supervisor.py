"""Run a command-line tool in a supervised child process, so every way it can end leaves no
partial output and says why in one line.

The child turns SIGINT, SIGTERM and SIGHUP into `Interrupted`, which unwinds through every open
`files.atomic_output` (removing its temporary file); a run that fails also removes the files it
completed (`lora-bundle package` writes several). The parent only waits and forwards those
signals. A signal the child cannot survive (SIGBUS when an input is truncated while mapped,
SIGSEGV, SIGKILL) kills it; the parent then prints one line and removes the temporary files the
child reported through a pipe (`files.report_partials`; files and staging folders). Forking costs milliseconds.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import traceback
from typing import Callable, NoReturn

import click

from . import files

HANDLED = files.HELD_SIGNALS
CAUSES = {
    signal.SIGBUS: "an input file was truncated or changed while it was being read",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGKILL: "killed from outside, often for lack of memory",
}
PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """A handled signal arrived; raised where the program is, so `finally` blocks clean up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame) -> None:
    for handled in HANDLED:  # a second Ctrl-C must not interrupt the cleanup
        signal.signal(handled, signal.SIG_IGN)
    raise Interrupted(signum)


def interrupted_line(signum: int) -> str:
    return f"error: interrupted by {signal.Signals(signum).name}; no output written"


def run_guarded(run: Callable[[], object]) -> int:
    """Run a click entry point with the handlers installed; its exit status. Files it completed
    are removed unless it succeeds."""
    for handled in HANDLED:
        signal.signal(handled, _interrupt)
    code: int = 0
    with files.output_group() as written:
        try:
            run()
        except SystemExit as exc:
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)  # what sys.exit("message") prints
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except Interrupted as exc:
            print(interrupted_line(exc.signum), file=sys.stderr)
            code = 128 + exc.signum
        except BaseException:  # a bug: show it rather than die silently
            traceback.print_exc()
            code = 1
        if code:
            written.discard()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def die_with_parent() -> None:
    """Linux: SIGTERM the child if the supervisor is killed (SIGKILL cannot be forwarded)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _read_names(fd: int) -> list[bytes]:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return [name for name in b"".join(chunks).split(b"\0") if name]


def supervise(run: Callable[[], object]) -> NoReturn:
    """Run `run` (a click entry point) in a child process and exit as it did (see the module)."""
    if not hasattr(os, "fork"):
        sys.exit(run_guarded(run))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        files.report_partials(write_end)
        die_with_parent()
        code = 1
        try:
            code = run_guarded(run)
        finally:
            os._exit(code)
    os.close(write_end)

    def forward(signum: int, _frame) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for handled in HANDLED:
        signal.signal(handled, forward)
    partials = _read_names(read_end)
    _, status = os.waitpid(pid, 0)
    if not os.WIFSIGNALED(status):
        sys.exit(os.waitstatus_to_exitcode(status))
    signum = os.WTERMSIG(status)
    for name in partials:
        if os.path.isdir(name) and not os.path.islink(name):
            shutil.rmtree(name, ignore_errors=True)
        elif os.path.lexists(name):
            os.unlink(name)
    if signum in HANDLED:
        message = interrupted_line(signum)
    else:
        cause = CAUSES.get(signal.Signals(signum), "a fatal signal")
        message = f"error: killed by {signal.Signals(signum).name} ({cause}); no output written"
    print(message, file=sys.stderr)
    sys.exit(128 + signum)


class Supervised:
    """Mixin for click commands: the entry point (`main()`, as console scripts and `python -m`
    call it) runs supervised; `main.main(...)`, as click's test runner calls it, runs in-process."""

    def __call__(self, *args, **kwargs):
        supervise(lambda: super(Supervised, self).__call__(*args, **kwargs))


class SupervisedCommand(Supervised, click.Command):
    pass


class SupervisedGroup(Supervised, click.Group):
    pass
