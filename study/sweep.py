"""Sweeps: run a parameterized notebook once per grid point with papermill, then a report notebook.

    python -m study sweep experiments/sweeps/mask_strength_cpu.yaml [--parallel 2] [--report-only]

A sweep file names a base config, a grid of ``--set`` overrides and seeds.
Each point gets a folder ``runs/<sweep>/<point>/`` with the pretraining run,
the executed notebook ``run.ipynb`` and a marker: ``done.json`` or
``failed.json`` (with the error). Points already done are skipped, so an
interrupted sweep resumes where it stopped; a failed point is retried on the
next invocation, reported in the summary, and never stops the others.
Notebooks are jupytext percent files in git; executed copies are outputs, except
the report, which also lands, scrubbed, in the committed ``reports/<sweep>.ipynb``
(:mod:`study.reports`; ``--report-only`` rebuilds it from the results table alone).
Each finished point prints one line (a failed one with the last line of its
cause, e.g. ``FileNotFoundError: ...`` raised inside the notebook); a progress
bar is drawn only on a terminal.

GPUs and threads: :mod:`study.sweep_workers`.

``random_baseline: once_per_seed``: the random-init encoder depends only on the
seed and the encoder's (and data's) config, so of the points sharing those only
the first in grid order evaluates it (the run notebook gets
``random_baseline=True``, the others ``False``); the choice is made on the whole
grid, so points already done do not move it. Without the key the run notebook
decides per objective (its ``random_baseline_objectives``).

``--seeds 3,4`` and ``--only objective=cimle`` run a part of the missing points
(some seeds; the points whose resolved config has that value); the other points'
rows stay in the table. After a change to one objective's code, a fresh checkout
reruns that objective's points alone against the committed rows of the others.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from study.config import ConfigError, config_to_dict, load_config, read_yaml
from study.console import duration, interactive
from study.errors import UserError
from study.io import atomic_write_text
from study.notebook import execute_notebook
from study.reports import build_report
from study.results import check_table, drop_stale_points, point_seconds, points_with_rows
from study.sweep_workers import check_gpus, gpu_queue, gpu_record, init_worker, resolve_gpus, worker_count

__all__ = ["Sweep", "Point", "load_sweep", "run_sweep", "run_sweeps", "error_cause"]

RANDOM_BASELINE_RULES = ("once_per_seed",)


@dataclass
class Sweep:
    name: str
    config: str
    run_notebook: str = "notebooks/run.py"
    report_notebook: str | None = None
    results: str = "runs/results.csv"
    runs_dir: str = "runs"
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    # a mapping {key: [values]} (every combination), or a list of such mappings
    # (the union of their combinations, e.g. random masks at 4 ratios and block masks at 2)
    grid: dict[str, list] | list[dict[str, list]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    fixed: dict[str, Any] = field(default_factory=dict)
    parallel: int | None = None  # points run at once (default 1, or one per GPU when gpus are given)
    gpus: list[int] | str | None = None  # one per worker: indices among the visible GPUs, or "auto" (all)
    random_baseline: str | None = None  # "once_per_seed": see the module docstring
    parameters: dict[str, Any] = field(default_factory=dict)  # extra papermill parameters for the run notebook
    report_parameters: dict[str, Any] = field(default_factory=dict)
    root: str = "."  # paths above are relative to this (the repository root)

    def path(self, rel: str) -> Path:
        return (Path(self.root) / rel).resolve()


@dataclass
class Point:
    overrides: list[str]
    seed: int
    # hash of the resolved config: the slug names only the overrides, so a changed base config
    # (or a changed default in the code) leaves the slug alone but changes this
    config: str = ""
    random_baseline: bool | None = None  # None: the run notebook's own rule
    settings: dict = field(default_factory=dict, repr=False, compare=False)  # the resolved config, as a mapping

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
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    valid = set(Sweep.__dataclass_fields__)
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; valid keys: {sorted(valid)}")
    data.setdefault("name", path.stem)
    data.setdefault("root", str(root))
    if "config" not in data:
        raise ConfigError(f"{path}: 'config' (the base config file) is required")
    grid = data.get("grid", {})
    subgrids = grid if isinstance(grid, list) else [grid]
    for i, sub in enumerate(subgrids):
        where = f"grid[{i}]" if isinstance(grid, list) else "grid"
        if not isinstance(sub, dict):
            raise ConfigError(f"{path}: {where} must be a mapping of key: [values]")
        for key, values in sub.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: {where}.{key} must be a non-empty list")
    check_gpus(data.get("gpus"), path)
    _check_parallel(data.get("parallel"), path)
    _check_random_baseline(data, path)
    return Sweep(**data)


def _check_parallel(parallel: Any, path: Path) -> None:
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(f"{path}: parallel must be an integer >= 1 (points run at once), not {parallel!r}")


def _check_random_baseline(data: dict, path: Path) -> None:
    rule = data.get("random_baseline")
    if rule is None:
        return
    if rule not in RANDOM_BASELINE_RULES:
        raise ConfigError(f"{path}: random_baseline must be one of {list(RANDOM_BASELINE_RULES)}, not {rule!r}")
    if "random_baseline" in (data.get("parameters") or {}):
        raise ConfigError(f"{path}: random_baseline is set both at the top level and in parameters; keep one")


def expand(sweep: Sweep) -> list[Point]:
    """Every grid combination (of each sub-grid) times every seed; each point's config is validated up front."""
    fixed = [f"{k}={_yaml_value(v)}" for k, v in sweep.fixed.items()]
    points = []
    encoders = []
    for grid in sweep.grid if isinstance(sweep.grid, list) else [sweep.grid]:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            for seed in sweep.seeds:
                overrides = fixed + [f"{k}={_yaml_value(v)}" for k, v in zip(keys, values)] + [f"seed={seed}"]
                cfg = load_config(sweep.path(sweep.config), overrides)  # fail before any work
                points.append(Point(overrides=overrides, seed=seed, config=_fingerprint(cfg),
                                    settings=config_to_dict(cfg)))
                encoders.append(_random_encoder_key(cfg))
    if sweep.random_baseline == "once_per_seed":
        _assign_random_baseline(points, encoders)
    return points


def _fingerprint(cfg) -> str:
    return _digest(config_to_dict(cfg))


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _random_encoder_key(cfg) -> str:
    """What the random-init encoder's rows depend on: the seed, the encoder's architecture and the data."""
    full = config_to_dict(cfg)
    encoder = {k: v for k, v in full["model"].items() if not k.startswith("decoder_") and k != "norm_pix_loss"}
    return _digest({"seed": cfg.seed, "model": encoder, "data": full["data"]})


def _assign_random_baseline(points: list[Point], encoders: list[str]) -> None:
    """The first point (in grid order) of each seed and encoder evaluates the random-init encoder."""
    seen: set[str] = set()
    for point, key in zip(points, encoders):
        point.random_baseline = key not in seen
        seen.add(key)


def _done_config(folder: Path) -> str | None:
    """The config fingerprint a point's ``done.json`` records (None: not done, or unreadable)."""
    try:
        return json.loads((folder / "done.json").read_text()).get("config")
    except (OSError, ValueError):
        return None


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _run_point(sweep: Sweep, point: Point) -> tuple[str, str | None, float]:
    folder = sweep.path(sweep.runs_dir) / sweep.name / point.slug
    # done with another config: start over, not resume; done with this one but without rows: resume
    stale = (folder / "done.json").exists() and _done_config(folder) != point.config
    (folder / "done.json").unlink(missing_ok=True)
    if stale and (folder / "run").exists():
        shutil.rmtree(folder / "run")
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
    atomic_write_text(folder / "done.json", json.dumps(
        {"point": point.slug, "overrides": point.overrides, "config": point.config,
         "seconds": time.time() - start, **gpu_record()}, indent=1))
    return point.slug, None, time.time() - start


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


def run_sweep(sweep: Sweep, *, parallel: int | None = None, gpus: list[int] | str | None = None,
              report: bool = True, progress: bool = True, seeds: list[int] | None = None,
              only: list[tuple[str, Any]] = ()) -> dict:
    """Run the missing points, then the report notebook; returns a summary dict (also printed).

    ``parallel`` and ``gpus`` (a list of indices, ``"auto"`` or ``"0,1"``) replace the sweep file's.
    ``seeds`` (a subset of the file's) runs only those seeds' missing points; ``only`` (pairs of a dotted
    config key and a value) only the missing points whose resolved config has every one of those values.
    The rows of the other points stay in the table, as the grid is still the whole file's (seeds split
    across machines; one objective rerun after a change to its code).
    """
    return run_sweeps([sweep], parallel=parallel, gpus=gpus, report=report, progress=progress, seeds=seeds,
                      only=only)[0]


def run_sweeps(sweeps: list[Sweep], *, parallel: int | None = None, gpus: list[int] | str | None = None,
               report: bool = True, progress: bool = True, seeds: list[int] | None = None,
               only: list[tuple[str, Any]] = ()) -> list[dict]:
    """:func:`run_sweep` for several sweeps whose missing points share one pool of workers, the longest
    first: each point's time recorded in its sweep's results table (its last run) orders them, points
    without one go first in grid order. A pool that ends on one long point leaves the other workers
    idle; longest first keeps them busy to the end. ``parallel`` (default: the largest of the files')
    and ``gpus`` (default: the files', which must then agree) apply to the pool."""
    if parallel is not None and parallel < 1:
        raise UserError(f"parallel must be >= 1 (points run at once), got {parallel}")
    if gpus is None and len({json.dumps(s.gpus) for s in sweeps}) > 1:
        raise UserError("the sweep files list different gpus: pass --gpus for the run")
    gpu_ids = resolve_gpus(gpus if gpus is not None else sweeps[0].gpus)
    files_parallel = max((s.parallel for s in sweeps if s.parallel is not None), default=None)
    workers = worker_count(parallel or files_parallel, gpu_ids)
    plans = [_plan(sweep, seeds, only, progress) for sweep in sweeps]
    if only and not any(plan.selected for plan in plans):
        key = only[0][0]
        seen = sorted({repr(_setting(p.settings, key)) for plan in plans for p in plan.points})
        raise UserError(f"no point has {' and '.join(f'{k}={v!r}' for k, v in only)}; "
                        f"its points have {key} in {', '.join(seen)}")
    jobs = _longest_first(plans)
    failures: dict[str, dict[str, str]] = {s.name: {} for s in sweeps}
    seconds: dict[str, dict[str, float]] = {s.name: {} for s in sweeps}
    bar = tqdm(total=len(jobs), desc=f"sweep {'+'.join(s.name for s in sweeps)}",
               disable=not (progress and interactive()))
    done = 0

    def finished(sweep: Sweep, slug: str, error: str | None, sec: float) -> None:
        nonlocal done
        done += 1
        seconds[sweep.name][slug] = sec
        if error:
            failures[sweep.name][slug] = error
        if progress:
            status = f"FAILED: {error}" if error else "done"
            where = f"{sweep.name}/" if len(sweeps) > 1 else ""
            bar.write(f"point {done}/{len(jobs)} {where}{slug} ({duration(sec)}): {status}")
        bar.update(1)

    if workers == 1 and gpu_ids is None:
        for sweep, point in jobs:
            finished(sweep, *_run_point(sweep, point))
    else:
        # each point runs its own kernel; spawn keeps the workers free of the parent's threads, and the
        # cores are split between workers (kernels inherit OMP_NUM_THREADS) instead of oversubscribed;
        # with gpus even one worker gets a pool, so CUDA_VISIBLE_DEVICES never touches this process
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // workers)
        queue = gpu_queue(context, gpu_ids)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                 initializer=init_worker, initargs=(threads, queue)) as pool:
            futures = {pool.submit(_run_point, sweep, p): sweep for sweep, p in jobs}
            for fut in as_completed(futures):
                finished(futures[fut], *fut.result())
    bar.close()
    return [_finish(plan, failures[plan.sweep.name], seconds[plan.sweep.name], report) for plan in plans]


@dataclass
class _Plan:
    sweep: Sweep
    points: list[Point]
    todo: list[Point]
    skipped: int
    seconds: dict[str, float]  # each point's time in its last run, as its rows in the table record it
    selected: int  # points that the seeds and the ``only`` values pick, done or not


_MISSING = object()


def _setting(settings: dict, key: str) -> Any:
    node: Any = settings
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _plan(sweep: Sweep, seeds: list[int] | None, only: list[tuple[str, Any]], progress: bool) -> _Plan:
    """The sweep's points and those to run now (``seeds``, ``only``: only those picked)."""
    if seeds is not None and not set(seeds) <= set(sweep.seeds):
        raise UserError(f"seeds {sorted(set(seeds) - set(sweep.seeds))} are not in {sweep.name}'s seeds "
                        f"{sweep.seeds}: add them to the sweep file, or pick from those")
    points = expand(sweep)
    for key, _ in only:
        if points and _setting(points[0].settings, key) is _MISSING:
            raise UserError(f"--only {key}: not a config key (e.g. objective, mask.ratio, noise.block, cimle.k)")
    picked = [p for p in points if (seeds is None or p.seed in seeds)
              and all(_setting(p.settings, key) == value for key, value in only)]
    check_table(sweep.path(sweep.results))  # a table the points could not append to fails now, not at the end
    base = sweep.path(sweep.runs_dir) / sweep.name
    # done: ran to the end with the config it would run with now, and its rows are in the table (a run of
    # a smaller grid drops the rows of the points it lacks, and leaves their done markers)
    tabled = points_with_rows(sweep.path(sweep.results))
    recorded = {p.slug: _done_config(base / p.slug) for p in points}
    is_done = {p.slug: recorded[p.slug] == p.config and p.slug in tabled for p in points}
    todo = [p for p in picked if not is_done[p.slug]]
    untabled = sum(recorded[p.slug] == p.config for p in todo)
    changed = sum((base / p.slug / "done.json").exists() and recorded[p.slug] != p.config for p in todo)
    if changed and progress:
        print(f"{sweep.name}: {changed} point(s) done before with another config (base config or defaults "
              "changed, or run before configs were fingerprinted): rerunning them")
    if untabled and progress:
        print(f"{sweep.name}: {untabled} point(s) done before but without rows in {sweep.results} (a run of a "
              "smaller grid dropped them): evaluating them again from their checkpoints")
    return _Plan(sweep, points, todo, sum(is_done.values()), point_seconds(sweep.path(sweep.results)), len(picked))


def _longest_first(plans: list[_Plan]) -> list[tuple[Sweep, Point]]:
    """Every plan's points to run, by their recorded time, longest first; unrecorded ones first, in grid
    order (stable sort)."""
    jobs = [(plan, p) for plan in plans for p in plan.todo]
    jobs.sort(key=lambda job: -job[0].seconds.get(job[1].slug, float("inf")))
    return [(plan.sweep, p) for plan, p in jobs]


def _finish(plan: _Plan, failures: dict[str, str], seconds: dict[str, float], report: bool) -> dict:
    """Drop the rows of points no longer in the grid, build the report, print and return the summary."""
    sweep = plan.sweep
    summary = {"sweep": sweep.name, "points": len(plan.points), "ran": len(plan.todo), "skipped_done": plan.skipped,
               "failed": failures, "seconds": round(sum(seconds.values()), 1), "report": None,
               # rows of points that the current grid and base config no longer produce
               "stale_rows_dropped": drop_stale_points(sweep.path(sweep.results), sweep.name,
                                                       [p.slug for p in plan.points])}
    if report and sweep.report_notebook:
        try:
            summary["report"] = str(build_report(sweep))  # reports/<sweep>.ipynb, committed
        except Exception as exc:  # noqa: BLE001
            summary["report_error"] = error_cause(exc)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    print(f"sweep {summary['sweep']}: {summary['points']} points, ran {summary['ran']}, "
          f"already done {summary['skipped_done']}, failed {len(summary['failed'])} "
          f"({summary['seconds']} s of point time)")
    for slug, error in summary["failed"].items():
        print(f"  FAILED {slug}: {error[:300]}")
    if summary.get("stale_rows_dropped"):
        print(f"  dropped {summary['stale_rows_dropped']} rows of points no longer in the grid")
    if summary.get("report"):
        print(f"  report: {summary['report']}")
    if summary.get("report_error"):
        print(f"  report FAILED: {summary['report_error'][:300]}")
