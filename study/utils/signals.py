"""Stopping on a signal: SIGTERM (a cluster's pre-emption) is raised like Ctrl-C, so that every
``finally`` runs, and whatever the command started (a sweep's kernels and workers) is stopped with it."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

import psutil

from study.utils.errors import UserError

__all__ = ["Interrupted", "sigterm_raises", "stop_descendants"]


class Interrupted(UserError):
    """The command was stopped by a signal; the message says what was kept and how to go on."""

    def __init__(self, message: str, signal_name: str = "SIGINT") -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_status = 143 if signal_name == "SIGTERM" else 130


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` in the main thread (default: the process dies
    at once, leaving its children running and its ``finally`` blocks unrun)."""

    def raise_interrupted(signum, frame):  # noqa: ARG001 - the handler's signature
        raise Interrupted("stopped by SIGTERM", "SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupted)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_descendants(grace: float = 5.0) -> int:
    """Terminate every process this one started (recursively), then kill those still alive after ``grace``
    seconds; returns how many there were."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return len(children)
