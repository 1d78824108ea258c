"""The tidy results table: one metric value per row, with every parameter that produced it.

Rows are appended under a file lock (``<table>.lock``, present only while a writer
holds it) and written atomically (whole file to a temporary, then renamed), so
parallel runs never interleave and a crash never leaves a half-written table;
figures come only from the table. When it cannot be written, :func:`append_rows`
saves the rows to a CSV in the system temporary folder, usually another file system
than the one that failed, and the :class:`study.utils.errors.WriteError` names it.
:func:`check_table` refuses before any work a path rows could not be appended to.
Every read checks the table and names the ``path:line`` a hand edit broke (a row of
the wrong length, text in a :data:`NUMERIC` column), and a rewrite keeps integer
columns integers, so no good row is padded, dropped or changed silently. k-NN writes a
row per k (``knn_k``); :func:`read_results` keeps the k = 20 ones (:func:`knn_at`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import fcntl
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import pandas as pd

from study.utils.errors import WRITE_ERRNOS, UserError, WriteError, write_error
from study.utils.io import atomic_write

__all__ = ["HEADLINE_KNN_K", "append_rows", "check_table", "count_stale_rows", "drop_stale_points", "knn_at",
           "point_seconds", "read_point_rows", "read_results", "save_rows_aside", "write_results", "ResultsTableError"]

# the k of every k-NN number the study reports, and of every knn_top1 row written before rows named their k
HEADLINE_KNN_K = 20

REQUIRED = ("metric", "value")
# columns that hold numbers in every table the study writes: text there is a hand edit, not a result
NUMERIC = ("value", "seed", "epochs", "config_epochs", "train_seconds", "k", "mask_ratio", "mask_strength",
           "noise_dim", "mvae_beta", "knn_k", "knn_temperature", "img_size", "patch_size", "embed_dim", "depth",
           "decoder_dim", "decoder_depth", "synthetic_mean_shift", "sign_flip_p", "probe_blr", "probe_batch_size",
           "probe_epochs", "probe_min_steps", "steps", "linear_steps", "linear_batch")
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


class ResultsTableError(UserError, ValueError):
    """A results table that cannot be read or appended to; the message names the path (and line) and the fix."""


def _read_existing(path: Path) -> pd.DataFrame | None:
    """The checked table at ``path``, or None when there is none yet (missing, empty or blank file).

    Columns written as integers come back as pandas' nullable ``Int64``, so that a rewrite keeps them so.
    """
    parsed = _parse(path)
    if parsed is None:
        return None
    frame, integers = parsed
    return frame.astype({c: "Int64" for c in integers}) if integers else frame


def _parse(path: Path) -> tuple[pd.DataFrame, set[str]] | None:
    """The checked table at ``path`` as pandas reads it, and its columns written as integers only."""
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
        lines, records = _scan(path)
        frame = pd.read_csv(path)
    except ResultsTableError:
        raise
    except (csv.Error, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResultsTableError(f"{path} is not a readable CSV table ({reason}); fix it or give another "
                                "--results path") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        shown = ", ".join(map(str, list(frame.columns)[:8])) + (", ..." if len(frame.columns) > 8 else "")
        raise ResultsTableError(f"{path}:{lines[0]}: not a results table: it lacks column(s) {', '.join(missing)} "
                                f"(it has {shown}); fix its header line or give another --results path")
    if len(frame) != len(records):  # pandas and csv disagree on the rows: no line to name, no text to look at
        lines, records = [lines[0]] * (len(frame) + 1), None
    _check_numbers(path, frame, lines)
    return frame, _integer_columns(frame, records)


def _scan(path: Path) -> tuple[list[int], list[list[str]]]:
    """Each row's first line number (the header's first) and its fields; a row whose field count is not the
    header's is refused, by line (pandas pads a short row silently)."""
    lines: list[int] = []
    records: list[list[str]] = []
    header = None
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        end = 0
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line, which pandas skips too
            if header is None:
                header = record
            elif len(record) != len(header):
                raise ResultsTableError(
                    f"{path}:{start}: this results table row has {len(record)} fields where the header has "
                    f"{len(header)} ({'a field is missing' if len(record) < len(header) else 'an extra comma or field'}"
                    "); fix or delete that line")
            else:
                records.append(record)
            lines.append(start)
    return lines, records


def _check_numbers(path: Path, frame: pd.DataFrame, lines: list[int]) -> None:
    """Refuse text in a :data:`NUMERIC` column, naming the first line that holds some."""
    for col in frame.columns:
        if col not in NUMERIC or pd.api.types.is_numeric_dtype(frame[col]):
            continue
        bad = (frame[col].notna() & pd.to_numeric(frame[col], errors="coerce").isna()).to_numpy().nonzero()[0]
        if len(bad):
            row = int(bad[0])
            raise ResultsTableError(f"{path}:{lines[row + 1]}: results table column {col} holds "
                                    f"{frame[col].iloc[row]!r}, not a number ({len(bad)} such row(s)); write a number "
                                    "there or delete the line")


def _integer_columns(frame: pd.DataFrame, records: list[list[str]] | None) -> set[str]:
    """The columns whose values are all written as integers; pandas reads them as floats when one is missing."""
    out = {c for c in frame.columns if pd.api.types.is_integer_dtype(frame[c])}
    for i, col in enumerate(frame.columns):
        if records is None or frame[col].dtype != "float64" or not frame[col].notna().any():
            continue
        present = frame[col].notna().to_numpy()
        if all(_INTEGER.fullmatch(record[i]) for record, there in zip(records, present) if there):
            out.add(col)
    return out


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
    """The rows as a frame; a column of integers with gaps stays integers (``Int64``), not floats."""
    rows = list(rows)
    frame = pd.DataFrame(rows)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if len(frame) and missing:
        raise ValueError(f"result rows need columns {list(REQUIRED)}; missing {missing}")
    integers = [c for c in frame.columns if _all_integers(row.get(c) for row in rows)]
    return frame.astype({c: "Int64" for c in integers}) if integers else frame


def _all_integers(values: Iterable) -> bool:
    present = [v for v in values if not (v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)))]
    return bool(present) and all(pd.api.types.is_integer(v) for v in present)  # bools are not integers here


def _join(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """``old`` then ``new``. A column is written as the old rows have it (integers stay integers while every
    value is one, floats stay floats), so that no kept row changes; a new column as the new rows have it."""
    if old is None:
        return new
    frame = pd.concat([old, new], ignore_index=True, sort=False)
    for col in frame.columns:
        kind = old if col in old.columns and old[col].notna().any() else new
        if col not in kind.columns or kind[col].dtype != "Int64" or frame[col].dtype == "Int64":
            continue
        numbers = pd.to_numeric(frame[col], errors="coerce")
        if numbers.notna().sum() == frame[col].notna().sum() and (numbers.dropna() % 1 == 0).all():
            frame[col] = numbers.astype("Int64")
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
            frame = _join(old, new)
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
    with _locked(path):
        old = _read_existing(path)
        stale = _stale(old, sweep, points)
        if stale.any():
            frame = old[~stale]
            atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
        return int(stale.sum())


def count_stale_rows(path: str | Path, sweep: str, points: Iterable[str]) -> int:
    """How many rows of ``sweep`` have a ``point`` not in ``points`` (kept unless the sweep is pruned)."""
    return int(_stale(_read_existing(Path(path)), sweep, points).sum())


def _stale(old: pd.DataFrame | None, sweep: str, points: Iterable[str]) -> pd.Series:
    """Which rows of ``old`` belong to ``sweep`` but to none of ``points`` (rows without a point never do)."""
    if old is None or not {"sweep", "point"} <= set(old.columns):
        return pd.Series(False, index=[] if old is None else old.index)
    keep = {str(p) for p in points}
    return (old["sweep"].astype(str) == sweep) & old["point"].notna() & ~old["point"].astype(str).isin(keep)


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


def read_results(path: str | Path, knn_k: int | None = HEADLINE_KNN_K) -> pd.DataFrame:
    """The table at ``path``, checked (:class:`ResultsTableError` names the line a hand edit broke), with
    its ``knn_top1`` rows at ``knn_k`` neighbours only (:func:`knn_at`; None: every k)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}")
    parsed = _parse(path)
    if parsed is None:
        raise ResultsTableError(f"{path} is empty: it has no header line; rerun what writes it or restore it")
    return knn_at(parsed[0], knn_k)


def knn_at(table: pd.DataFrame, k: int | None = HEADLINE_KNN_K) -> pd.DataFrame:
    """``table`` with a ``knn_k`` on every ``knn_top1`` row (20 where it has none: such a row predates the
    rows per k, and 20 was the only k then) and, unless ``k`` is None, only the ``knn_top1`` rows at ``k``,
    so that a figure or statistic never averages accuracies of different k. Other rows are kept."""
    if "metric" not in table.columns:
        return table
    knn = table["metric"].astype(str) == "knn_top1"
    if not knn.any():
        return table
    table = table.copy()
    if "knn_k" not in table.columns:
        table["knn_k"] = pd.Series(pd.NA, index=table.index, dtype="Int64")
    table.loc[knn & table["knn_k"].isna(), "knn_k"] = HEADLINE_KNN_K
    if k is None:
        return table
    return table[~knn | (pd.to_numeric(table["knn_k"], errors="coerce") == k)].reset_index(drop=True)
