"""Sweeps: run a parameterized notebook once per grid point with papermill, then a report notebook.

    python -m study sweep experiments/sweeps/mask_strength_cpu.yaml [--parallel 2] [--report-only]

A sweep file names a base config, a grid of ``--set`` overrides and seeds; each point runs in
``runs/<sweep>/<point>/`` and writes its rows there (:mod:`study.studies.points`). The table is rewritten
only by this process, a point's rows replaced only when its new ones exist, so Ctrl-C, SIGTERM or a
failed point lose no row; rows of points the grid lacks stay unless ``--prune``. A sweep file git does
not track never writes a tracked table (it writes under ``runs/<name>/``). Points done are skipped, so a
rerun resumes; ``--seeds`` and ``--only KEY=VALUE`` run a part of the grid. ``random_baseline:
once_per_seed`` evaluates the random-init encoder at the first point (in grid order) of each seed and
encoder. GPUs and threads: :mod:`study.studies.workers`; reports: :mod:`study.studies.reports`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from study.config import ConfigError, config_to_dict, load_config, read_yaml
from study.utils.console import duration, interactive
from study.utils.errors import UserError
from study.utils.io import tracked_by_git
from study.studies.reports import build_report
from study.evaluation.results import check_table, count_stale_rows, drop_stale_points, point_seconds, points_with_rows
from study.utils.signals import Interrupted, stop_descendants
from study.studies.points import ROWS_FILE, done_config, error_cause, marker_config, merge_point, merged_into, run_point
from study.studies.workers import check_gpus, gpu_queue, init_worker, resolve_gpus, worker_count

__all__ = ["Sweep", "Point", "default_root", "load_sweep", "pending_points", "run_sweep", "run_sweeps", "error_cause"]


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
    # paths above are relative to this; default: the folder holding the experiments/ the file lies in (the
    # repository root), else the working directory
    root: str = "."
    reports_dir: str = "reports"  # where the scrubbed report lands (committed for the shipped sweeps)

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


def load_sweep(path: str | Path, root: str | Path | None = None, write_committed: bool = False,
               report_only: bool = False) -> Sweep:
    """The sweep in ``path``. A sweep file that git does not track writes no file that git does (its table,
    report and figures go under ``runs/<name>/`` instead) unless ``write_committed``: a copy of a shipped
    sweep, edited, never rewrites the committed results.

    Relative paths resolve against the file's ``root``, else ``root``, else :func:`default_root`. The
    files it names must exist now (``report_only``: the report notebook), not fail point by point."""
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
    data.setdefault("root", str(root if root is not None else default_root(path)))
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
    sweep = Sweep(**data)
    _check_files(sweep, path, report_only)
    if not write_committed:
        _keep_committed_files(sweep, path)
    return sweep


def default_root(path: Path) -> Path:
    """The folder that holds the ``experiments/`` above the sweep file (the repository root, wherever the
    command runs), else the working directory."""
    for folder in path.resolve().parents:
        if folder.name == "experiments":
            return folder.parent
    return Path(".")


def _check_files(sweep: Sweep, path: Path, report_only: bool) -> None:
    """Refuse a sweep whose config or notebooks are missing, naming where they were looked for."""
    keys = ["report_notebook"] if report_only else ["config", "run_notebook", "report_notebook"]
    for key in keys:
        rel = getattr(sweep, key)
        if rel is None or sweep.path(rel).is_file():
            continue
        raise ConfigError(f"{path}: {key} {rel} not found (looked for {sweep.path(rel)}: relative paths resolve "
                          f"against root {Path(sweep.root).resolve()}); fix the path or set root: in the sweep file")


def _keep_committed_files(sweep: Sweep, path: Path) -> None:
    """Send an untracked sweep file's outputs that would land on tracked files to ``runs/<name>/``."""
    if tracked_by_git(path):
        return
    own = f"{sweep.runs_dir}/{sweep.name}"
    figures = sweep.report_parameters.get("figures")
    committed = tracked_by_git(sweep.path(sweep.results)) or tracked_by_git(
        sweep.path(sweep.reports_dir) / f"{sweep.name}.ipynb") or (
        figures is not None and any(tracked_by_git(f) for f in sweep.path(figures).glob(f"{sweep.name}*")))
    if not committed:
        return
    print(f"{path} is not a committed sweep file, so it writes {own}/results.csv, not the committed "
          f"{sweep.results} (pass --write-committed to write there on purpose)")
    sweep.results = f"{own}/results.csv"
    sweep.reports_dir = own
    if figures is not None:
        sweep.report_parameters = {**sweep.report_parameters, "figures": f"{own}/figures"}


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
                point = Point(overrides=overrides, seed=seed, config=_fingerprint(cfg), settings=config_to_dict(cfg))
                if any(p.slug == point.slug for p in points):
                    raise ConfigError(f"{sweep.name}: the grid has the point {' '.join(overrides)} twice (a "
                                      "repeated value, or sub-grids that overlap); list each value once")
                points.append(point)
                encoders.append(_random_encoder_key(cfg))
    if sweep.random_baseline == "once_per_seed":
        _assign_random_baseline(points, encoders)
    return points


def _fingerprint(cfg) -> str:
    """A hash of the settings that differ from the code's defaults: a new config field whose default keeps
    the old behaviour leaves every point's fingerprint, and so its done marker, as it was."""
    return _digest(_changed(config_to_dict(cfg), config_to_dict(type(cfg)())))


def _changed(settings: dict, defaults: dict) -> dict:
    out = {}
    for key, value in settings.items():
        default = defaults.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            value = _changed(value, default)
            if value:
                out[key] = value
        elif value != default:
            out[key] = value
    return out


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


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def run_sweep(sweep: Sweep, *, parallel: int | None = None, gpus: list[int] | str | None = None,
              report: bool = True, progress: bool = True, seeds: list[int] | None = None,
              only: list[tuple[str, Any]] = (), prune: bool = False) -> dict:
    """Run the missing points, then the report notebook; returns a summary dict (also printed).

    ``parallel`` and ``gpus`` (a list of indices, ``"auto"`` or ``"0,1"``) replace the sweep file's.
    ``seeds`` (a subset of the file's) runs only those seeds' missing points; ``only`` (pairs of a dotted
    config key and a value) only the missing points whose resolved config has every one of those values.
    The rows of the other points stay in the table, as the grid is still the whole file's (seeds split
    across machines; one objective rerun after a change to its code).
    """
    return run_sweeps([sweep], parallel=parallel, gpus=gpus, report=report, progress=progress, seeds=seeds,
                      only=only, prune=prune)[0]


def run_sweeps(sweeps: list[Sweep], *, parallel: int | None = None, gpus: list[int] | str | None = None,
               report: bool = True, progress: bool = True, seeds: list[int] | None = None,
               only: list[tuple[str, Any]] = (), prune: bool = False) -> list[dict]:
    """:func:`run_sweep` for several sweeps whose missing points share one pool of workers, the longest
    first: each point's time recorded in its sweep's results table (its last run) orders them, points
    without one go first in grid order. A pool that ends on one long point leaves the other workers
    idle; longest first keeps them busy to the end. ``parallel`` (default: the largest of the files')
    and ``gpus`` (default: the files', which must then agree) apply to the pool. ``prune`` drops the rows
    of points that the grid no longer has (kept by default).

    Ctrl-C or SIGTERM stops the running points' kernels and raises :class:`Interrupted`; the table is
    only ever rewritten whole, by this process, when a point ends, so it keeps every row it had."""
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

    def finished(sweep: Sweep, point: Point, result: tuple[str, str | None, float]) -> None:
        nonlocal done
        slug, error, sec = result
        done += 1
        seconds[sweep.name][slug] = sec
        note = merge_point(sweep, point, failed=bool(error))
        if error:
            failures[sweep.name][slug] = error + (f" ({note})" if note else "")
        if progress:
            status = f"FAILED: {failures[sweep.name][slug]}" if error else "done"
            where = f"{sweep.name}/" if len(sweeps) > 1 else ""
            bar.write(f"point {done}/{len(jobs)} {where}{slug} ({duration(sec)}): {status}")
        bar.update(1)

    try:
        if workers == 1 and gpu_ids is None:
            for sweep, point in jobs:
                finished(sweep, point, run_point(sweep, point))
        else:
            _run_pool(jobs, workers, gpu_ids, finished)
    except (KeyboardInterrupt, Interrupted) as exc:
        bar.close()
        stop_descendants()  # the points' kernels (and a pool's workers): nothing runs on after the sweep
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        raise Interrupted(f"sweep stopped by {name} after {done} of {len(jobs)} points; every table keeps the rows "
                          "it had; run the same command again to resume (a point's training resumes from its "
                          "last checkpoint)", name) from None
    bar.close()
    return [_finish(plan, failures[plan.sweep.name], seconds[plan.sweep.name], report, prune) for plan in plans]


def pending_points(sweep: Sweep, seeds: list[int] | None = None, only: list[tuple[str, Any]] = ()) -> list[Point]:
    """The points a run of the sweep would run now (rows of points that ended meanwhile are merged first)."""
    return _plan(sweep, seeds, only, progress=True).todo


def _run_pool(jobs: list[tuple[Sweep, Point]], workers: int, gpu_ids: list[str] | None, finished) -> None:
    """Each point runs its own kernel; spawn keeps the workers free of the parent's threads, and the
    cores are split between workers (kernels inherit OMP_NUM_THREADS) instead of oversubscribed; with
    gpus even one worker gets a pool, so CUDA_VISIBLE_DEVICES never touches this process."""
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    queue = gpu_queue(context, gpu_ids)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=init_worker,
                               initargs=(threads, queue))
    try:
        futures = {pool.submit(run_point, sweep, p): (sweep, p) for sweep, p in jobs}
        for fut in as_completed(futures):
            finished(*futures[fut], fut.result())
    finally:
        # on an interrupt, waiting for the running points would let them finish after the sweep stopped
        pool.shutdown(wait=False, cancel_futures=True)


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
    table = sweep.path(sweep.results)
    # ended with this config, but its rows are not (or not from this run) in this table: the sweep stopped
    # between a point's end and its merge, or the point was merged into another table; merge them now
    tabled = points_with_rows(table)
    merged = [p for p in points if marker_config(base / p.slug) == p.config and (base / p.slug / ROWS_FILE).exists()
              and not (merged_into(base / p.slug) == str(table) and p.slug in tabled)]
    for p in merged:
        merge_point(sweep, p, failed=False)
    if merged and progress:
        print(f"{sweep.name}: {len(merged)} point(s) had ended without their rows in {sweep.results}: merged them")
    # done: ran to the end with the config it would run with now, and its rows are in the table (a run
    # with --prune drops the rows of the points its grid lacks, and leaves their done markers)
    tabled = points_with_rows(table)
    recorded = {p.slug: done_config(base / p.slug) for p in points}
    is_done = {p.slug: recorded[p.slug] == p.config and p.slug in tabled for p in points}
    todo = [p for p in picked if not is_done[p.slug]]
    untabled = sum(recorded[p.slug] == p.config for p in todo)
    changed = sum((base / p.slug / "done.json").exists() and recorded[p.slug] != p.config for p in todo)
    if changed and progress:
        print(f"{sweep.name}: {changed} point(s) done before with another config (base config or defaults "
              "changed, or run before configs were fingerprinted): rerunning them")
    if untabled and progress:
        print(f"{sweep.name}: {untabled} point(s) done before but without rows in {sweep.results}: "
              "evaluating them again from their checkpoints")
    return _Plan(sweep, points, todo, sum(is_done.values()), point_seconds(sweep.path(sweep.results)), len(picked))


def _longest_first(plans: list[_Plan]) -> list[tuple[Sweep, Point]]:
    """Every plan's points to run, by their recorded time, longest first; unrecorded ones first, in grid
    order (stable sort)."""
    jobs = [(plan, p) for plan in plans for p in plan.todo]
    jobs.sort(key=lambda job: -job[0].seconds.get(job[1].slug, float("inf")))
    return [(plan.sweep, p) for plan, p in jobs]


def _finish(plan: _Plan, failures: dict[str, str], seconds: dict[str, float], report: bool, prune: bool) -> dict:
    """Count (or, with ``prune``, drop) the rows of points no longer in the grid, build the report, print and
    return the summary."""
    sweep = plan.sweep
    table, slugs = sweep.path(sweep.results), [p.slug for p in plan.points]
    summary = {"sweep": sweep.name, "points": len(plan.points), "ran": len(plan.todo), "skipped_done": plan.skipped,
               "failed": failures, "seconds": round(sum(seconds.values()), 1), "report": None,
               "stale_rows_dropped": drop_stale_points(table, sweep.name, slugs) if prune else 0,
               "stale_rows_kept": 0 if prune else count_stale_rows(table, sweep.name, slugs)}
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
    if summary.get("stale_rows_kept"):
        print(f"  kept {summary['stale_rows_kept']} rows of points not in this grid (--prune drops them)")
    if summary.get("report"):
        print(f"  report: {summary['report']}")
    if summary.get("report_error"):
        print(f"  report FAILED: {summary['report_error'][:300]}")
