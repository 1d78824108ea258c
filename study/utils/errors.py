"""User errors: a mistake the user can fix is reported as one line ``error: ...``, not a traceback.

Commands raise :class:`UserError` (or a subclass) with a message that names
the problem and the fix; :func:`run_command` prints it as one line on stderr
and returns its exit status (2 unless the class says otherwise). ``--debug``
re-raises instead, so the traceback is there when it is wanted.

A write that fails for want of room or a working device (full disk, quota,
file size limit, read-only or failing file system) is the user's to fix too:
:class:`WriteError` names the file and what is still on disk, and a plain
``OSError`` with one of :data:`WRITE_ERRNOS` is printed as one line as well.
"""

from __future__ import annotations

import argparse

import errno
import sys
from pathlib import Path
from typing import Callable

__all__ = ["UserError", "USER_ERRORS", "WRITE_ERRNOS", "WriteError", "is_write_failure", "one_line", "run_command", "run_parsed",
           "write_error"]


class UserError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_status = 2


# OS errors about a path the user gave (a missing --checkpoint, a folder that cannot be written)
# are the user's to fix as well; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
)


# what a full or broken disk answers a write; freeing space (or fixing the device) and rerunning fixes it
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


class WriteError(UserError, OSError):
    """A file could not be written; the message says which, why, and what is kept.

    An ``OSError`` as well (``errno`` set where known), so that code which handles
    a failed write as one keeps doing so.
    """

    def __init__(self, path: str | Path, reason: str, kept: str, code: int | None = None) -> None:
        self.path, self.reason, self.kept, self.code = Path(path), reason, kept, code
        super().__init__(f"cannot write {path}: {reason}; {kept}")
        self.errno = code

    def __reduce__(self):  # crosses process boundaries (DataLoader workers, multiprocessing) intact
        return type(self), (self.path, self.reason, self.kept, self.code)

    def with_kept(self, kept: str) -> "WriteError":
        """The same failure, with what a caller knows is kept (e.g. which checkpoint) in place of the file's."""
        return WriteError(self.path, self.reason, kept, self.code)

    @property
    def remedy(self) -> str:
        """What lets the write succeed when it is tried again."""
        return _REMEDIES.get(self.code, "free space")


_REMEDIES = {errno.EFBIG: "raise the file size limit (ulimit -f)", errno.EROFS: "make the file system writable",
             errno.EIO: "check the disk"}


def is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, WriteError) or (isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS)


def write_error(exc: OSError, path: str | Path, kept: str) -> WriteError:
    """``exc`` (one of :data:`WRITE_ERRNOS`) as a :class:`WriteError` about ``path``."""
    if isinstance(exc, WriteError):
        return exc.with_kept(kept)
    return WriteError(path, exc.strerror or str(exc), kept, exc.errno)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    An error re-raised by a DataLoader worker carries the worker's whole
    traceback in its message; its last line holds the original message.
    """
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Original Traceback" in text:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and "." in head and " " not in head else last
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[1]}"


def run_command(func: Callable[[], int], *, debug: bool = False) -> int:
    """Call ``func`` and turn a user error (or Ctrl-C) into one line on stderr and an exit status."""
    try:
        return func()
    except KeyboardInterrupt as exc:
        if debug:
            raise
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
        print(f"error: interrupted{notes}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except OSError as exc:
        if debug or exc.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def run_parsed(parser: argparse.ArgumentParser, argv: list[str] | None, func: Callable[[argparse.Namespace], int],
               *, debug: bool | None = None) -> int:
    """Parse ``argv`` and run ``func(args)`` through :func:`run_command` (``debug``: default ``args.debug``). A
    mistake in the flags (its one line already printed) or ``--help`` returns argparse's exit status."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return run_command(lambda: func(args), debug=getattr(args, "debug", False) if debug is None else debug)
