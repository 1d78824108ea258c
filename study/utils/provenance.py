"""Which code and package versions produced a file: the git commit of this package and the library versions.

Run folders, checkpoints and results rows record it. It never raises: whatever git cannot
tell (no git, an installed wheel, a failed call) is None.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["provenance", "git_state"]

SOURCE = Path(__file__).resolve().parents[1]  # the package's own folder: the code that runs
PACKAGES = ("torch", "torchvision", "timm")
GIT_TIMEOUT_S = 5.0


def provenance() -> dict:
    """``git_commit`` (full hash or None), ``git_dirty`` (tracked files changed since it; None: unknown) and the
    ``torch``, ``torchvision``, ``timm`` and ``python`` versions (None: not installed)."""
    return dict(_cached())  # a copy: a caller that adds to it must not change what later callers get


@functools.cache
def _cached() -> dict:
    return {**git_state(SOURCE), **{name: _version(name) for name in PACKAGES}, "python": platform.python_version()}


def git_state(folder: Path) -> dict:
    """``git_commit`` and ``git_dirty`` of the checkout that tracks ``folder``; both None where git cannot tell."""
    # a wheel installed into a virtual environment inside some other checkout sits in that checkout's tree
    # without being tracked by it: its commit would be that checkout's, so an untracked folder counts as none
    tracked = _git(folder, "ls-files", "--", ".")
    commit = _git(folder, "rev-parse", "HEAD") if tracked else None
    if not commit:
        return {"git_commit": None, "git_dirty": None}
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else status != ""}


def _git(folder: Path, *args: str) -> str | None:
    """The stripped output of ``git -C folder args``, or None when git is missing, fails or hangs."""
    # no optional locks: git status would otherwise rewrite the index, racing the other ranks of a torchrun job
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(name: str) -> str | None:
    # the module's own version, not the installed metadata's: only it names the build (torch's "+cu130")
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:  # noqa: BLE001 - a missing or broken package is an unknown version, never an error
        return None
