"""User errors: a mistake the user can fix is reported as one line ``error: ...``, not a traceback.

Commands raise :class:`UserError` (or a subclass) with a message that names
the problem and the fix; :func:`run_command` prints it as one line on stderr
and returns its exit status (2 unless the class says otherwise). ``--debug``
re-raises instead, so the traceback is there when it is wanted.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["UserError", "USER_ERRORS", "one_line", "run_command"]


class UserError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_status = 2


# OS errors about a path the user gave (a missing --checkpoint, a folder that cannot be written)
# are the user's to fix as well; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
)


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
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
