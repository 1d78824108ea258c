"""The tidy results table: one metric value per row, with every parameter that produced it.

Rows are appended under a file lock and written atomically (whole file to a
temporary, then renamed), so parallel runs never interleave and a crash never
leaves a half-written table. pandas reads the CSV; figures come only from it.
The lock file (``<table>.lock``) exists only while a writer holds it.

When the table cannot be written (full disk, quota, read-only), the rows of
:func:`append_rows` go to a CSV in the system temporary folder and the
:class:`study.errors.WriteError` names it: the table's own folder is the one
that just failed, the temporary folder usually lies on another file system.

:func:`check_table` tells before any work whether rows could be appended to a
path: a folder, an unwritable place, a file that is not a CSV (binary, ragged
rows) or a CSV without ``metric`` and ``value`` columns is refused with
:class:`ResultsTableError`. An empty or blank file counts as an empty table.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import pandas as pd

from study.errors import WRITE_ERRNOS, UserError, WriteError, write_error
from study.io import atomic_write

__all__ = ["append_rows", "check_table", "count_stale_rows", "drop_stale_points", "point_seconds", "read_point_rows",
           "read_results", "save_rows_aside", "write_results", "ResultsTableError"]

REQUIRED = ("metric", "value")


class ResultsTableError(UserError, ValueError):
    """A results table that rows cannot be appended to; the message names the path and why."""


def _read_existing(path: Path) -> pd.DataFrame | None:
    """The table at ``path``, or None when there is none yet (missing, empty or blank file)."""
    if path.is_dir():
        raise ResultsTableError(f"results table {path} is a folder; give a .csv file path")
    if not path.exists():
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
            blank = not head.strip() and not fh.read(1)
    except OSError as exc:
        raise ResultsTableError(f"cannot read results table {path}: {exc.strerror or exc}") from None
    if blank:
        return None
    if b"\0" in head:
        raise ResultsTableError(f"{path} is not a CSV table (binary content); give another --results path")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResultsTableError(f"{path} is not a readable CSV table ({reason}); fix it or give another "
                                "--results path") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        shown = ", ".join(map(str, list(frame.columns)[:8])) + (", ..." if len(frame.columns) > 8 else "")
        raise ResultsTableError(f"{path} is not a results table: it lacks column(s) {', '.join(missing)} (it has "
                                f"{shown}); give another --results path")
    return frame


def _writable_place(path: Path) -> None:
    """The lock file and the atomic rewrite are created beside ``path``: its folder must be writable."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent  # created on the first write
    if not folder.is_dir():
        raise ResultsTableError(f"cannot create results table {path}: {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ResultsTableError(f"cannot write results table {path}: {folder} is not writable; give another "
                                "--results path")


def check_table(path: str | Path) -> Path:
    """Raise :class:`ResultsTableError` unless rows can be appended to ``path``; cheap, touches nothing."""
    path = Path(path)
    _read_existing(path)
    _writable_place(path)
    return path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` exclusively; the lock file is removed on release.

    A waiter may have opened the file that the holder then unlinks: after
    flock it checks that the path still names the file it locked, and
    starts over if not, so that two writers never hold two different files.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock_path)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, lock_path, "the table is unchanged") from exc
        raise
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)  # while still locked: whoever opened it meanwhile sees it is gone and retries
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # releases the lock


def _acquire(lock_path: Path) -> int:
    while True:
        # read-only is enough for flock, and opens a lock file that another user created
        fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(lock_path, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is (still) the open file ``fd``."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _frame(rows: Iterable[Mapping]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    missing = [c for c in REQUIRED if c not in frame.columns]
    if len(frame) and missing:
        raise ValueError(f"result rows need columns {list(REQUIRED)}; missing {missing}")
    return frame


def write_results(path: str | Path, rows: Iterable[Mapping] | pd.DataFrame) -> Path:
    """Replace the table at ``path`` with ``rows``, atomically."""
    path = Path(path)
    frame = rows if isinstance(rows, pd.DataFrame) else _frame(rows)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def append_rows(path: str | Path, rows: Iterable[Mapping], replace: Mapping | None = None) -> Path:
    """Append rows (dicts with at least ``metric`` and ``value``); new columns are added.

    ``replace`` (e.g. ``{"sweep": "mask_strength_cpu", "point": "..."}``) first drops
    the rows that match all its items, so rerunning a sweep point replaces its
    rows instead of adding a second copy.
    """
    path = Path(path)
    new = _frame(rows)
    try:
        with _locked(path):
            old = _read_existing(path)
            if old is not None and replace:
                same = pd.Series(True, index=old.index)
                for key, value in replace.items():
                    same &= (old[key].astype(str) == str(value)) if key in old.columns else False
                old = old[~same]
            frame = new if old is None else pd.concat([old, new], ignore_index=True, sort=False)
            atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    except WriteError as exc:
        raise _rows_not_written(exc, path, new) from exc
    return path


def _rows_not_written(exc: WriteError, path: Path, new: pd.DataFrame) -> WriteError:
    """The failed append, saying where its rows are now: a side file in the temporary folder, if one can be written."""
    if new.empty:
        return exc
    table = "the previous table is kept" if path.exists() else "no table was written"
    side = save_rows_aside(path, new, [Path(tempfile.gettempdir())])
    if side is None:
        where = f"the {len(new)} new rows could not be saved elsewhere either"
    else:
        where = f"the {len(new)} new rows are saved in {side}"
    error = exc.with_kept(f"{table}, and {where}")
    error.rows, error.saved_in = new, side
    return error


def save_rows_aside(path: str | Path, rows: Iterable[Mapping] | pd.DataFrame,
                    folders: Sequence[str | Path]) -> Path | None:
    """Write rows that could not reach the table at ``path`` to ``<stem>.unsaved-<time>-<pid>.csv`` in the
    first of ``folders`` that takes them; None if none does."""
    name = f"{Path(path).stem}.unsaved-{_dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.csv"
    for folder in folders:
        try:
            return write_results(Path(folder) / name, rows)
        except OSError:
            continue
    return None


def drop_stale_points(path: str | Path, sweep: str, points: Iterable[str]) -> int:
    """Drop the rows of ``sweep`` whose ``point`` is not in ``points`` (the sweep's current grid).

    A sweep's table is the table of its grid: rows of points that a changed grid or base
    config no longer produces would otherwise be averaged with the new ones. Returns the
    number of rows dropped; rows of other sweeps and rows without a point are kept.
    """
    path = Path(path)
    keep = {str(p) for p in points}
    with _locked(path):
        old = _read_existing(path)
        if old is None or not {"sweep", "point"} <= set(old.columns):
            return 0
        stale = (old["sweep"].astype(str) == sweep) & old["point"].notna() & ~old["point"].astype(str).isin(keep)
        if stale.any():
            frame = old[~stale]
            atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
        return int(stale.sum())


def count_stale_rows(path: str | Path, sweep: str, points: Iterable[str]) -> int:
    """How many rows of ``sweep`` have a ``point`` not in ``points`` (kept unless the sweep is pruned)."""
    old = _read_existing(Path(path))
    if old is None or not {"sweep", "point"} <= set(old.columns):
        return 0
    keep = {str(p) for p in points}
    return int(((old["sweep"].astype(str) == sweep) & old["point"].notna()
                & ~old["point"].astype(str).isin(keep)).sum())


def read_point_rows(path: str | Path) -> pd.DataFrame | None:
    """The rows a sweep point wrote to its own file (None: it wrote none)."""
    return _read_existing(Path(path))


def points_with_rows(path: str | Path) -> set[str]:
    """The ``point`` values that have rows in the table at ``path`` (none when there is no table yet)."""
    with _locked(Path(path)):
        old = _read_existing(Path(path))
    if old is None or "point" not in old.columns:
        return set()
    return set(old["point"].dropna().astype(str))


def point_seconds(path: str | Path) -> dict[str, float]:
    """Each point's recorded time in the table at ``path``: its training seconds plus the seconds of its
    evaluations (``*_seconds`` metrics); empty when there is no table or no such columns."""
    with _locked(Path(path)):
        old = _read_existing(Path(path))
    if old is None or not {"point", "train_seconds"} <= set(old.columns):
        return {}
    old = old[old["point"].notna()]
    train = pd.to_numeric(old["train_seconds"], errors="coerce").groupby(old["point"].astype(str)).max()
    timed = old[old["metric"].astype(str).str.endswith("_seconds")]
    evals = pd.to_numeric(timed["value"], errors="coerce").groupby(timed["point"].astype(str)).sum()
    total = train.add(evals, fill_value=0.0).dropna()
    return {str(k): float(v) for k, v in total.items()}


def read_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}")
    return pd.read_csv(path)
