"""A sweep point's run and its rows: each point writes its own rows file, and the sweep merges it into
the table when the point ends, so an interrupted or failed point never replaces committed rows.

Markers in the point's folder: ``evaluated.json`` (the notebook ran to the end; its rows are complete),
``done.json`` (they are merged; it names the table), ``failed.json`` (with the error).
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

from study.utils.io import atomic_write_text
from study.studies.notebook import execute_notebook
from study.evaluation.results import append_rows, points_with_rows, read_point_rows
from study.studies.workers import gpu_record

__all__ = ["ROWS_FILE", "done_config", "error_cause", "marker_config", "merge_point", "merged_into", "run_point"]

ROWS_FILE = "rows.csv"  # a point's own rows, in its folder; the sweep's table is assembled from them


def done_config(folder: Path, marker: str = "done.json") -> str | None:
    """The config fingerprint a point's ``done.json`` (or ``evaluated.json``) records (None: none, or unreadable)."""
    try:
        return json.loads((folder / marker).read_text()).get("config")
    except (OSError, ValueError):
        return None


def marker_config(folder: Path) -> str | None:
    """The config a point last ran to the end with: merged (``done.json``) or evaluated, not yet merged."""
    return done_config(folder) or done_config(folder, "evaluated.json")


def point_folder(sweep, point) -> Path:
    return sweep.path(sweep.runs_dir) / sweep.name / point.slug


def run_point(sweep, point) -> tuple[str, str | None, float]:
    """Run one point's notebook; its rows go to the point's own ``rows.csv``, never to the shared table.

    The parent merges them into the table (:func:`merge_point`), so an interrupted point never
    touches committed rows, and only one process ever writes the table.
    """
    folder = point_folder(sweep, point)
    # done with another config: start over, not resume; done with this one but without rows: resume
    stale = marker_config(folder) not in (None, point.config)
    for marker in ("done.json", "evaluated.json", "failed.json", ROWS_FILE):
        (folder / marker).unlink(missing_ok=True)
    if stale and (folder / "run").exists():
        shutil.rmtree(folder / "run")
    folder.mkdir(parents=True, exist_ok=True)
    params = {
        "config": str(sweep.path(sweep.config)),
        "overrides": point.overrides,
        "out": str(folder / "run"),
        "results": str(folder / ROWS_FILE),
        "protocols": ",".join(sweep.protocols),
        "sweep": sweep.name,
        "point": point.slug,
        **sweep.parameters,
    }
    if point.random_baseline is not None:
        params["random_baseline"] = point.random_baseline
    start = time.time()
    try:
        execute_notebook(sweep.path(sweep.run_notebook), folder / "run.ipynb", params, cwd=Path(sweep.root).resolve())
    except Exception as exc:  # noqa: BLE001 - a failed point is recorded, the sweep goes on
        error = error_cause(exc)
        atomic_write_text(folder / "failed.json", json.dumps(
            {"point": point.slug, "overrides": point.overrides, "error": error, **gpu_record(),
             "traceback": traceback.format_exc()[-4000:]}, indent=1))
        return point.slug, error, time.time() - start
    # evaluated: the rows are complete in rows.csv; the parent renames this to done.json once they are merged
    atomic_write_text(folder / "evaluated.json", json.dumps(
        {"point": point.slug, "overrides": point.overrides, "config": point.config,
         "seconds": time.time() - start, **gpu_record()}, indent=1))
    return point.slug, None, time.time() - start


def merge_point(sweep, point, failed: bool) -> str | None:
    """Put a finished point's rows into the sweep's table; returns a note for the summary, if any.

    A point that ended replaces its rows in the table by its new ones, in one atomic rewrite. A failed
    point's rows (the protocols before the failure) are added only when the table has none of that
    point: committed rows are never replaced by a partial set.
    """
    folder = point_folder(sweep, point)
    rows = read_point_rows(folder / ROWS_FILE)
    if rows is not None:
        rows = rows.assign(sweep=sweep.name, point=point.slug)
    table = sweep.path(sweep.results)
    if failed:
        if rows is None or rows.empty:
            return None
        if point.slug in points_with_rows(table):
            return f"kept its rows in the table; the failed run's {len(rows)} rows are in {folder / ROWS_FILE}"
        append_rows(table, rows.to_dict("records"))
        return None
    if rows is not None and not rows.empty:
        append_rows(table, rows.to_dict("records"), replace={"sweep": sweep.name, "point": point.slug})
    marker = folder / ("evaluated.json" if (folder / "evaluated.json").exists() else "done.json")
    atomic_write_text(folder / "done.json", json.dumps({**json.loads(marker.read_text()), "table": str(table)},
                                                       indent=1))
    (folder / "evaluated.json").unlink(missing_ok=True)
    return None


def merged_into(folder: Path) -> str | None:
    """The table a done point's rows were merged into (None: not recorded)."""
    try:
        return json.loads((folder / "done.json").read_text()).get("table")
    except (OSError, ValueError):
        return None


def error_cause(exc: BaseException) -> str:
    """``"Type: message"`` of what went wrong; for an error raised inside a notebook, the notebook's error.

    papermill's own message starts with a blank line and a cell banner; the
    kernel's exception name and value are on the exception.
    """
    name = getattr(exc, "ename", None)
    if name:
        value = str(getattr(exc, "evalue", "") or "").strip()
        last = value.splitlines()[-1] if value else ""
        return f"{name}: {last}" if last else name
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip()}" if lines else type(exc).__name__
