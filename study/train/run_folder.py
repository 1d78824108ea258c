"""What ``--out`` may be: a new or empty folder, or a folder that already holds a run.

A run folder is recognised by its ``checkpoint.pt`` or by a ``config.yaml``
that reads as this project's config. Anything else is refused before any
work, so that a mistyped ``--out`` (``results/``, a home folder) never gets
its files replaced; a path that cannot be written is refused as early. A run
that fails before its first checkpoint takes back what it wrote there
(:class:`FolderAtStart`), and a failed write says what is kept
(:func:`failed_write`). ``provenance.jsonl`` names the code and package versions
that trained it (:func:`record_provenance`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from study.train.checkpoint import CHECKPOINT
from study.config import ConfigError, config_from_dict
from study.utils.errors import UserError, WriteError, write_error
from study.utils.io import atomic_write_text, writable_folder
from study.utils.provenance import provenance
from study.train.tensorboard import TENSORBOARD_DIR

__all__ = ["METRICS", "PROVENANCE", "RunFolderError", "check_run_folder", "is_run_folder", "record_provenance",
           "FolderAtStart", "failed_write"]

METRICS = "metrics.jsonl"
PROVENANCE = "provenance.jsonl"


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


def record_provenance(out: Path, start_epoch: int) -> None:
    """Add to ``out/provenance.jsonl`` a line ``{"start_epoch": n, **provenance()}``: the code that trains the run
    from epoch ``n`` on.

    One line per start, because a resumed run may go on under other code than it began with; the lines of
    earlier starts at or after ``start_epoch`` go, as their epochs are trained again (as in ``metrics.jsonl``).
    """
    path = out / PROVENANCE
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    kept = [line for line in lines if _start_epoch(line) < start_epoch]
    kept.append(json.dumps({"start_epoch": start_epoch, **provenance()}))
    atomic_write_text(path, "\n".join(kept) + "\n")


def _start_epoch(line: str) -> float:
    """The ``start_epoch`` of a line of ``provenance.jsonl``; infinity for a damaged line, so that it is dropped."""
    try:
        return int(json.loads(line)["start_epoch"])
    except (ValueError, TypeError, KeyError):
        return float("inf")


# --------------------------------------------------------------------------- a failed run: what it takes back


@dataclass
class FolderAtStart:
    """What ``--out`` held when the run started, so that a run without a checkpoint can take its files back."""

    out: Path
    made: bool  # the run creates the folder
    names: frozenset[str] | None  # what it held; None: not a folder, nothing there is the run's

    @classmethod
    def look(cls, out: Path) -> "FolderAtStart":
        if not out.exists():
            return cls(out, True, frozenset())
        try:
            return cls(out, False, frozenset(os.listdir(out)) if out.is_dir() else None)
        except OSError:
            return cls(out, False, None)

    def undo(self, keep_log: bool = True) -> bool:
        """Remove what the run wrote, unless it saved weights (or, with ``keep_log``, logged an epoch: the
        metrics of a run that diverged say what went wrong); True when ``--out`` itself is gone."""
        # under torchrun every rank checks the folder, rank 0 writes it: only rank 0 takes it back
        if self.names is None or os.environ.get("RANK", "0") != "0" or not self.out.is_dir():
            return False
        if _holds_weights(self.out) or (keep_log and _logged_an_epoch(self.out)):
            return False
        for name in (*_RUN_FILES, *(p.name for p in self.out.glob(".*.tmp"))):
            if name not in self.names:
                _remove_path(self.out / name)
        if not self.made:
            return False
        try:
            self.out.rmdir()  # only if empty: anything else in it is not the run's
        except OSError:
            return False
        return True


_RUN_FILES = ("config.yaml", METRICS, PROVENANCE, TENSORBOARD_DIR, "snapshots")


def _holds_weights(out: Path) -> bool:
    return (out / CHECKPOINT).exists() or any((out / "snapshots").glob("*.pt"))


def _logged_an_epoch(out: Path) -> bool:
    try:
        return (out / METRICS).stat().st_size > 0
    except OSError:
        return False


def _remove_path(path: Path) -> None:
    """Best effort: the run's own error is the one to report, not a failed clean-up."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def failed_write(exc: OSError, out: Path, saved_epochs: int, removed: bool) -> WriteError:
    """The failed write of a run, saying which checkpoint is kept and how to continue."""
    failure = write_error(exc, exc.filename or out, "")
    remedy, ckpt = failure.remedy, out / CHECKPOINT
    where = "" if failure.path == ckpt else f" ({ckpt})"
    if saved_epochs:
        kept = (f"the checkpoint of epoch {saved_epochs} is kept{where}; {remedy} and rerun with --resume to "
                "continue from it")
    elif ckpt.exists():
        kept = f"{ckpt} is kept; {remedy} and rerun with --resume to continue from it"
    elif removed:
        kept = f"no checkpoint was written yet, so {out}, made by this run, is removed; {remedy} and rerun"
    else:
        kept = f"no checkpoint was written yet; {remedy} and rerun"
    return failure.with_kept(kept)
