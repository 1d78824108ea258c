"""The tidy results table: one metric value per row, with every parameter that produced it.

Rows are appended under a file lock and written atomically (whole file to a
temporary, then renamed), so parallel runs never interleave and a crash never
leaves a half-written table. pandas reads the CSV; figures come only from it.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import pandas as pd

from study.io import atomic_write

__all__ = ["append_rows", "read_results", "write_results"]

REQUIRED = ("metric", "value")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
    with _locked(path):
        old = pd.read_csv(path) if path.exists() and path.stat().st_size else None
        if old is not None and replace:
            same = pd.Series(True, index=old.index)
            for key, value in replace.items():
                same &= (old[key].astype(str) == str(value)) if key in old.columns else False
            old = old[~same]
        frame = new if old is None else pd.concat([old, new], ignore_index=True, sort=False)
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return path


def read_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}")
    return pd.read_csv(path)
