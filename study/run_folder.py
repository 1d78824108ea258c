"""What ``--out`` may be: a new or empty folder, or a folder that already holds a run.

A run folder is recognised by its ``checkpoint.pt`` or by a ``config.yaml``
that reads as this project's config. Anything else is refused before any
work, so that a mistyped ``--out`` (``results/``, a home folder) never gets
its files replaced; a path that cannot be written is refused as early.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from study.config import ConfigError, config_from_dict
from study.errors import UserError
from study.io import writable_folder

__all__ = ["RunFolderError", "check_run_folder", "is_run_folder"]


class RunFolderError(UserError):
    """``--out`` is a file, cannot be written, or holds something other than a run."""


def is_run_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    if (folder / "checkpoint.pt").is_file():
        return True
    config = folder / "config.yaml"
    if not config.is_file():
        return False
    try:
        data = yaml.safe_load(config.read_text())
        if not isinstance(data, dict):
            return False
        config_from_dict(data)
    except (ConfigError, yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return True


def check_run_folder(out: str | Path) -> Path:
    """Refuse an ``--out`` that is a file, holds something else than a run, or cannot be written.

    Creates the folder (it is the write test); an error names the path and the fix.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; give a folder for the run (a new one, or one that holds a run)")
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not is_run_folder(out):
        raise RunFolderError(f"--out {out} is not empty and holds no run (no checkpoint.pt or config.yaml of this "
                             "project); choose a new or empty folder so that its files are not overwritten")
    try:
        writable_folder(out)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RunFolderError(f"cannot write to --out {out}: {reason}; choose a folder you can write to") from exc
    return out
