"""One run per folder: a pretraining process holds an exclusive ``flock`` on ``<out>/.run.lock``.

The kernel drops an flock when its holder dies, however it dies (even
SIGKILL), so a lock file left by a dead run is simply taken over; the pid and
host written in it only serve the message of a refused run. Under torchrun
rank 0 holds the lock for all ranks. Where the file system has no flock the run
goes on unguarded rather than not at all.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from study.utils.errors import UserError
from study.utils.signals import sigterm_raises

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

__all__ = ["LOCK_NAME", "RunLocked", "RunLock", "hold_run_folder"]

LOCK_NAME = ".run.lock"  # hidden: a folder holding only a stale lock still counts as empty
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLocked(UserError):
    """A live process already trains into the run folder."""


class RunLock:
    """The lock of one run folder: :meth:`acquire` or raise :class:`RunLocked`, :meth:`release` on the way out."""

    def __init__(self, out: str | Path, resume: bool = False) -> None:
        self.out, self.resume = Path(out), resume
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        for _ in range(20):  # a holder removing its file between our open and flock: open the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLocked(self._refusal(holder)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    self._remove_if_empty()
                    return self
                raise
            if _same_file(fd, self.path):
                self.fd = fd
                break
            os.close(fd)
        else:
            raise RunLocked(self._refusal(None))
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove the file while still holding it (so that no newer holder's file goes), then let go."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _refusal(self, holder: tuple[str, str] | None) -> str:
        if holder is None:
            who, stop = "another live process", "stop it"
        else:
            pid, host = holder
            here = host in ("", socket.gethostname())
            who, stop = f"pid {pid}" + ("" if here else f" on {host}"), f"stop it (kill {pid})"
        if self.resume:
            return (f"--resume: the run in {self.out} is still running ({who}); wait for it to end, or {stop} and "
                    "then resume it")
        return (f"--out {self.out} is in use by a run that is still running ({who}); wait for it to end, or {stop} "
                "and resume it with --resume, or choose another --out")

    def _remove_if_empty(self) -> None:
        try:
            if self.path.stat().st_size == 0:
                self.path.unlink()
        except OSError:
            pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int) -> tuple[str, str] | None:
    """``(pid, host)`` written by the holder; it writes right after locking, so wait a moment for it."""
    for _ in range(10):
        words = os.pread(fd, 256, 0).decode(errors="replace").split()
        if words and words[0].isdigit():
            return words[0], words[1] if len(words) > 1 else ""
        time.sleep(0.05)
    return None


@contextmanager
def hold_run_folder(out: str | Path, resume: bool = False) -> Iterator[RunLock | None]:
    """Hold the lock of ``out`` for the block (rank 0 only).

    SIGTERM, which would otherwise kill the process on the spot, raises inside
    the block so that the lock file goes and the run takes back what it wrote;
    a handler someone else installed (submitit's) is left alone.
    """
    if os.environ.get("RANK", "0") != "0":
        yield None
        return
    default_term = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sigterm_raises() if default_term else nullcontext(), RunLock(out, resume) as lock:
        yield lock
