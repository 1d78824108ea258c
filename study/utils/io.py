"""Atomic file writes: a result or checkpoint is either the old file or the new one, never half.

A write that fails for want of room or a working device (see
:data:`study.utils.errors.WRITE_ERRNOS`, and the ``RuntimeError`` that ``torch.save``
raises in their place) becomes a :class:`study.utils.errors.WriteError` that names
the file, why, and whether its previous version is kept.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from study.utils.errors import WRITE_ERRNOS, WriteError, write_error

__all__ = ["atomic_write", "atomic_write_text", "remove_stale_temps", "writable_folder"]

_UMASK = os.umask(0)
os.umask(_UMASK)


# torch.save reports a failed write of its C++ stream writer as a RuntimeError holding one of these
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "iostream error", "file write failed")
# after a write failed for want of room, less than this is left; more means another cause (a quota)
_NEARLY_FULL = 16 << 20


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``.

    The temporary file lives in the same folder so that the rename is atomic;
    it is removed if ``write`` raises. A failed write (full disk, quota, size
    limit, read-only or failing device) raises :class:`WriteError`.
    """
    path = Path(path)
    kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, path, kept) from exc
        raise
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for reading like any new file
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        failure = _write_failure(exc, tmp)  # before the unlink: the half-written file tells the cause
        _remove(tmp)
        if failure is not None:
            reason = os.strerror(failure) if failure else "the write failed (a disk quota, or a device error?)"
            raise WriteError(path, reason, kept, failure or None) from exc
        raise


def _write_failure(exc: BaseException, tmp: str) -> int | None:
    """The errno of a write that failed for want of room or device (0: cause unknown); None for other errors."""
    if not isinstance(exc, Exception):
        return None  # Ctrl-C or exit while writing: not a failed write
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in WRITE_ERRNOS:
            return link.errno
    if any(isinstance(link, RuntimeError) and any(m in str(link) for m in _TORCH_WRITE_FAILURES)
           for link in _chain(exc)):
        return _torch_write_errno(tmp)
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _torch_write_errno(tmp: str) -> int:
    """torch's writer drops the errno: tell the cause from the file system and the file size limit (0: unknown)."""
    try:
        fs = os.statvfs(os.path.dirname(tmp))
        size = os.path.getsize(tmp)
    except OSError:
        return 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if limit != resource.RLIM_INFINITY and size >= limit:
        return errno.EFBIG
    if fs.f_bavail * fs.f_frsize < _NEARLY_FULL:
        return errno.ENOSPC
    return 0


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass  # gone already, or a broken device: remove_stale_temps takes it when the run restarts


def atomic_write_text(path: str | Path, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, _write)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.XXXX.tmp``) that a killed writer left in ``folder``.

    Call it only where no other process is writing, e.g. when a run starts.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def writable_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it (OSError if not)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder


def tracked_by_git(path: str | Path) -> bool:
    """Whether git tracks the file at ``path`` (False where there is no git, or no repository)."""
    path = Path(path).resolve()
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    try:
        done = subprocess.run(["git", "-C", str(folder), "ls-files", "--error-unmatch", "--", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
