"""Sweeps: run a parameterized notebook once per grid point with papermill, then a report notebook.

    python -m study sweep experiments/sweeps/mask_strength_cpu.yaml [--parallel 2] [--only-report]

A sweep file names a base config, a grid of ``--set`` overrides and seeds.
Each point gets a folder ``runs/<sweep>/<point>/`` with the pretraining run,
the executed notebook ``run.ipynb`` and a marker: ``done.json`` or
``failed.json`` (with the error). Points already done are skipped, so an
interrupted sweep resumes where it stopped; a failed point is retried on the
next invocation, reported in the summary, and never stops the others.
Notebooks are jupytext percent files in git; executed copies are outputs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from study.config import ConfigError, load_config
from study.io import atomic_write_text

__all__ = ["Sweep", "Point", "load_sweep", "run_sweep", "execute_notebook"]


@dataclass
class Sweep:
    name: str
    config: str
    run_notebook: str = "notebooks/run.py"
    report_notebook: str | None = None
    results: str = "results/results.csv"
    runs_dir: str = "runs"
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    grid: dict[str, list] = field(default_factory=dict)
    # override sets that belong together (e.g. cIMLE-token = objective + select + noise scope), each crossed
    # with the grid; the default is one empty variant
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    seeds: list[int] = field(default_factory=lambda: [0])
    fixed: dict[str, Any] = field(default_factory=dict)
    parallel: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)  # extra papermill parameters for the run notebook
    report_parameters: dict[str, Any] = field(default_factory=dict)
    root: str = "."  # paths above are relative to this (the repository root)

    def path(self, rel: str) -> Path:
        return (Path(self.root) / rel).resolve()


@dataclass
class Point:
    overrides: list[str]
    seed: int

    @property
    def slug(self) -> str:
        text = " ".join(sorted(self.overrides)) + f" seed={self.seed}"
        readable = "_".join(o.split("=", 1)[1] for o in self.overrides if not o.startswith("seed="))
        readable = "".join(c if c.isalnum() or c in ".-" else "-" for c in readable)[:60]
        return f"{readable}_s{self.seed}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def load_sweep(path: str | Path, root: str | Path = ".") -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    valid = set(Sweep.__dataclass_fields__)
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; valid keys: {sorted(valid)}")
    data.setdefault("name", path.stem)
    data.setdefault("root", str(root))
    if "config" not in data:
        raise ConfigError(f"{path}: 'config' (the base config file) is required")
    variants = data.get("variants", [{}])
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        raise ConfigError(f"{path}: variants must be a non-empty list of mappings (override -> value)")
    for key, values in data.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list")
    return Sweep(**data)


def expand(sweep: Sweep) -> list[Point]:
    """Every grid combination times every seed; each point's config is validated up front."""
    keys = list(sweep.grid)
    fixed = [f"{k}={_yaml_value(v)}" for k, v in sweep.fixed.items()]
    points = []
    for variant, values in itertools.product(sweep.variants, itertools.product(*(sweep.grid[k] for k in keys))):
        for seed in sweep.seeds:
            overrides = fixed + [f"{k}={_yaml_value(v)}" for k, v in variant.items()]
            overrides += [f"{k}={_yaml_value(v)}" for k, v in zip(keys, values)] + [f"seed={seed}"]
            load_config(sweep.path(sweep.config), overrides)  # fail before any work
            points.append(Point(overrides=overrides, seed=seed))
    return points


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def execute_notebook(source: Path, output: Path, parameters: dict, cwd: Path) -> None:
    """Execute a jupytext percent file (or .ipynb) with papermill into ``output`` (an .ipynb)."""
    import jupytext
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".py":
        staged = output.with_name(output.stem + ".input.ipynb")
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
        notebook.metadata.setdefault("language_info", {"name": "python"})
        jupytext.write(notebook, staged)
    else:
        staged = source
    try:
        papermill.execute_notebook(str(staged), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(cwd), progress_bar=False)
    finally:
        if staged != source:
            staged.unlink(missing_ok=True)


def _run_point(sweep: Sweep, point: Point) -> tuple[str, str | None, float]:
    folder = sweep.path(sweep.runs_dir) / sweep.name / point.slug
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed.json").unlink(missing_ok=True)
    params = {
        "config": str(sweep.path(sweep.config)),
        "overrides": point.overrides,
        "out": str(folder / "run"),
        "results": str(sweep.path(sweep.results)),
        "protocols": ",".join(sweep.protocols),
        "sweep": sweep.name,
        "point": point.slug,
        **sweep.parameters,
    }
    start = time.time()
    try:
        execute_notebook(sweep.path(sweep.run_notebook), folder / "run.ipynb", params, cwd=Path(sweep.root).resolve())
    except Exception as exc:  # noqa: BLE001 - a failed point is recorded, the sweep goes on
        error = f"{type(exc).__name__}: {exc}"
        atomic_write_text(folder / "failed.json", json.dumps(
            {"point": point.slug, "overrides": point.overrides, "error": error,
             "traceback": traceback.format_exc()[-4000:]}, indent=1))
        return point.slug, error, time.time() - start
    atomic_write_text(folder / "done.json", json.dumps(
        {"point": point.slug, "overrides": point.overrides, "seconds": time.time() - start}, indent=1))
    return point.slug, None, time.time() - start


def _limit_threads(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def run_sweep(sweep: Sweep, *, parallel: int | None = None, report: bool = True, progress: bool = True) -> dict:
    """Run the missing points, then the report notebook; returns a summary dict (also printed)."""
    from tqdm.auto import tqdm

    points = expand(sweep)
    base = sweep.path(sweep.runs_dir) / sweep.name
    todo = [p for p in points if not (base / p.slug / "done.json").exists()]
    skipped = len(points) - len(todo)
    workers = max(1, parallel or sweep.parallel)
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    bar = tqdm(total=len(todo), desc=f"sweep {sweep.name}", disable=not progress)
    if workers == 1:
        for point in todo:
            slug, error, sec = _run_point(sweep, point)
            seconds[slug] = sec
            if error:
                failures[slug] = error
            bar.update(1)
    else:
        # each point runs its own kernel; spawn keeps the workers free of the parent's threads, and the
        # cores are split between workers (kernels inherit OMP_NUM_THREADS) instead of oversubscribed
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_limit_threads, initargs=(threads,)) as pool:
            futures = [pool.submit(_run_point, sweep, p) for p in todo]
            for fut in as_completed(futures):
                slug, error, sec = fut.result()
                seconds[slug] = sec
                if error:
                    failures[slug] = error
                bar.update(1)
    bar.close()

    summary = {"sweep": sweep.name, "points": len(points), "ran": len(todo), "skipped_done": skipped,
               "failed": failures, "seconds": round(sum(seconds.values()), 1), "report": None}
    if report and sweep.report_notebook:
        out = base / "report.ipynb"
        try:
            execute_notebook(sweep.path(sweep.report_notebook), out,
                             {"results": str(sweep.path(sweep.results)), "sweep": sweep.name,
                              **sweep.report_parameters},
                             cwd=Path(sweep.root).resolve())
            summary["report"] = str(out)
        except Exception as exc:  # noqa: BLE001
            summary["report_error"] = f"{type(exc).__name__}: {exc}"
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    print(f"sweep {summary['sweep']}: {summary['points']} points, ran {summary['ran']}, "
          f"already done {summary['skipped_done']}, failed {len(summary['failed'])} "
          f"({summary['seconds']} s of point time)")
    for slug, error in summary["failed"].items():
        print(f"  FAILED {slug}: {error.splitlines()[0][:300]}")
    if summary.get("report"):
        print(f"  report: {summary['report']}")
    if summary.get("report_error"):
        print(f"  report FAILED: {summary['report_error'][:300]}")
