"""Executed study reports that a reader opens without running anything: ``reports/<sweep>.ipynb``.

A sweep's report notebook (``notebooks/<study>.py``) is executed with papermill
into ``runs/<sweep>/report.ipynb`` (the full record, not committed), then
copied to the committed ``reports/<sweep>.ipynb`` with everything that changes
from run to run or machine to machine removed: papermill's and the kernel's
timestamps, durations and paths, cell ids (made sequential), cell metadata
other than tags, the Python version, and the repository's absolute path (made
relative) in every output. A rerun therefore changes a report only where its
numbers change. The report reads only the sweep's results table, so
``python -m study sweep SWEEP --report-only`` (``make reports``) rebuilds it
from the committed ``results/*.csv`` without training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from study.evaluation.results import ResultsTableError, read_results
from study.utils.errors import UserError
from study.utils.io import atomic_write_text
from study.studies.notebook import execute_notebook
from study.studies.points import error_cause

__all__ = ["ReportError", "build_report", "scrub_notebook"]


class ReportError(UserError):
    """A report that was not built; the message names the notebook, the results table and the cause."""

    def __init__(self, message: str, exit_status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = exit_status  # 1 for a failing cell: the notebook's fault may be the code's

_KEEP_NOTEBOOK_METADATA = ("kernelspec",)
_KEEP_CELL_METADATA = ("tags",)


def _replace_paths(value: Any, paths: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for old, new in paths:
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_replace_paths(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: _replace_paths(v, paths) for k, v in value.items()}
    return value


def scrub_notebook(nb: dict, root: str | Path) -> dict:
    """A copy of the executed notebook ``nb`` (nbformat JSON) without run- or machine-specific content."""
    root = str(Path(root).resolve())
    home = str(Path.home())
    # longest first: the repository usually lies under the home folder
    paths = [(root + "/", ""), (root, "."), (home + "/", "~/"), (home, "~")]
    meta = {k: nb["metadata"][k] for k in _KEEP_NOTEBOOK_METADATA if k in nb.get("metadata", {})}
    meta["language_info"] = {"name": "python"}  # drops the interpreter version
    cells = []
    for i, cell in enumerate(nb["cells"]):
        cell = {**cell, "id": f"cell-{i}",
                "metadata": {k: v for k, v in cell.get("metadata", {}).items() if k in _KEEP_CELL_METADATA}}
        if cell["cell_type"] == "code":
            cell["outputs"] = _replace_paths(cell.get("outputs", []), paths)
            cell["source"] = _replace_paths(cell["source"], paths)
        cells.append(cell)
    return {**nb, "metadata": meta, "cells": cells}


def build_report(sweep) -> Path:
    """Execute ``sweep``'s report notebook on its results table; write ``reports/<sweep>.ipynb``.

    Raises FileNotFoundError when the sweep has no report notebook or no results table yet, and
    :class:`ReportError` when the table is broken or the notebook fails.
    """
    if not sweep.report_notebook:
        raise FileNotFoundError(f"sweep {sweep.name} names no report_notebook")
    results, notebook = sweep.path(sweep.results), sweep.path(sweep.report_notebook)
    if not results.is_file():
        raise FileNotFoundError(f"no results table at {results} for sweep {sweep.name}'s report {notebook}: "
                                "run the sweep first")
    try:
        read_results(results)  # a table broken by hand is named by its line before a kernel starts
    except ResultsTableError as exc:
        raise ReportError(f"report {notebook} not built: {exc}") from None
    root = Path(sweep.root).resolve()
    executed = sweep.path(sweep.runs_dir) / sweep.name / "report.ipynb"
    # paths relative to the repository root (the kernel's cwd), so none is absolute in the report
    params = {"results": sweep.results, "sweep": sweep.name, **sweep.report_parameters}
    try:
        execute_notebook(notebook, executed, params, cwd=root)
    except Exception as exc:  # noqa: BLE001 - papermill's error, as one line naming what ran on what
        raise ReportError(f"report {notebook} failed on {results}: {error_cause(exc)[:300]} (the executed "
                          f"notebook: {executed})", exit_status=1) from exc
    nb = scrub_notebook(json.loads(executed.read_text()), root)
    out = sweep.path(sweep.reports_dir) / f"{sweep.name}.ipynb"
    atomic_write_text(out, json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return out
