"""Sweeps: resume runs only missing points; a failing point is reported and the others finish."""

import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from conftest import SWEEP_PARAMETERS
from study.config import ConfigError
from study.utils.errors import UserError
from study.studies.sweep import expand, load_sweep, run_sweep

# A stand-in run notebook: records its point in the results table, or raises when told to.
RUN_NOTEBOOK = SWEEP_PARAMETERS + textwrap.dedent('''\
    # %%
    from study.evaluation.results import append_rows
    ratio = [o for o in overrides if o.startswith("mask.ratio=")][0].split("=")[1]
    if ratio == "0.9" and "seed=1" in overrides:
        raise RuntimeError("boom at " + point)
    append_rows(results, [{"point": point, "mask_ratio": float(ratio), "metric": "ran", "value": 1.0}])
''')

REPORT_NOTEBOOK = textwrap.dedent('''\
    # %% tags=["parameters"]
    results = ""
    sweep = ""

    # %%
    import pandas as pd
    print(len(pd.read_csv(results)))
''')


def _write_sweep(tmp_path: Path) -> Path:
    (tmp_path / "run.py").write_text(RUN_NOTEBOOK)
    (tmp_path / "report.py").write_text(REPORT_NOTEBOOK)
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent(f'''\
        name: tiny
        config: base.yaml
        run_notebook: run.py
        report_notebook: report.py
        results: results.csv
        runs_dir: runs
        grid:
          mask.ratio: [0.5, 0.9]
        seeds: [0, 1]
        root: {tmp_path}
    '''))
    (tmp_path / "base.yaml").write_text("objective: ls\n")
    return tmp_path / "sweep.yaml"


def test_failure_is_reported_and_restart_runs_only_missing(tmp_path, capfd):
    sweep = load_sweep(_write_sweep(tmp_path))
    points = expand(sweep)
    assert len(points) == 4

    first = run_sweep(sweep)  # progress on, output captured (not a terminal): one line per point, no bar
    assert first["ran"] == 4 and len(first["failed"]) == 1
    (failed,) = first["failed"]
    assert "0.9" in failed and "boom" in first["failed"][failed]
    captured = capfd.readouterr()  # file descriptors: the kernels' output too
    out = captured.out
    # the console names the cause raised inside the notebook, not only papermill's wrapper
    assert f"FAILED {failed}: RuntimeError: boom at {failed}" in out, out
    assert "PapermillExecutionError" not in out
    assert "\r" not in out + captured.err
    assert "IPKernelApp" not in captured.err  # no kernel start-up chatter, once per point
    points = [line for line in out.splitlines() if line.startswith("point ")]
    assert len(points) == 4 and sum(line.endswith(": done") for line in points) == 3, out
    assert (tmp_path / "runs" / "tiny" / failed / "failed.json").exists()
    assert first["report"] is not None
    assert len(pd.read_csv(tmp_path / "results.csv")) == 3

    # interrupt: forget one finished point, as if the sweep had been killed before it ran
    done = sorted((tmp_path / "runs" / "tiny").glob("*/done.json"))
    done[0].unlink()
    second = run_sweep(sweep, progress=False, report=False)
    assert second["skipped_done"] == 2
    assert second["ran"] == 2  # the forgotten point and the failed one, nothing else
    assert len(second["failed"]) == 1


def test_bad_grid_fails_before_any_work(tmp_path):
    path = _write_sweep(tmp_path)
    path.write_text(path.read_text().replace("[0.5, 0.9]", "[0.5, 1.5]"))
    with pytest.raises(ConfigError, match="mask.ratio"):
        expand(load_sweep(path))
    assert not (tmp_path / "runs").exists()


def test_a_list_of_grids_is_the_union_of_their_combinations(tmp_path):
    path = _write_sweep(tmp_path)
    path.write_text(path.read_text().replace("grid:\n  mask.ratio: [0.5, 0.9]\n",
                                             "grid:\n  - {mask.kind: [random], mask.ratio: [0.5, 0.9]}\n"
                                             "  - {mask.kind: [block], mask.ratio: [0.75]}\n"))
    points = expand(load_sweep(path))
    kinds = sorted((p.overrides[0], p.overrides[1], p.seed) for p in points)
    assert kinds == sorted([(f"mask.kind={k}", f"mask.ratio={r}", s)
                            for k, r in [("random", 0.5), ("random", 0.9), ("block", 0.75)] for s in (0, 1)])
    assert len({p.slug for p in points}) == 6
    path.write_text(path.read_text().replace("  - {mask.kind: [block], mask.ratio: [0.75]}\n", "  - [block]\n"))
    with pytest.raises(ConfigError, match=r"grid\[1\] must be a mapping"):
        load_sweep(path)


def test_unusable_results_table_fails_before_any_point(tmp_path):
    path = _write_sweep(tmp_path)
    (tmp_path / "results.csv").mkdir()  # a folder where the table should go
    with pytest.raises(ValueError, match="is a folder"):
        run_sweep(load_sweep(path), progress=False)
    assert not (tmp_path / "runs").exists()



def test_rows_of_points_no_longer_in_the_grid_are_kept_unless_pruned(tmp_path, capsys):
    """A smaller grid (a shipped sweep edited in place) keeps the rows of the points it lacks."""
    sweep = load_sweep(_write_sweep(tmp_path))
    stale = {"metric": "knn_top1", "value": 0.1, "sweep": "tiny", "point": "an-old-point_s0_deadbeef"}
    other = {"metric": "knn_top1", "value": 0.2, "sweep": "another", "point": "x"}
    pd.DataFrame([stale, other]).to_csv(tmp_path / "results.csv", index=False)
    summary = run_sweep(sweep, progress=False, report=False)
    assert summary["stale_rows_dropped"] == 0 and summary["stale_rows_kept"] == 1
    assert "kept 1 rows of points not in this grid (--prune drops them)" in capsys.readouterr().out
    assert {"an-old-point_s0_deadbeef", "x"} <= set(pd.read_csv(tmp_path / "results.csv").point)
    summary = run_sweep(sweep, progress=False, report=False, prune=True)
    table = pd.read_csv(tmp_path / "results.csv")
    assert summary["stale_rows_dropped"] == 1 and "dropped 1 rows" in capsys.readouterr().out
    assert "an-old-point_s0_deadbeef" not in set(table.point) and "x" in set(table.point)
    assert set(table.point) - {"x"} <= {p.slug for p in expand(sweep)}


def test_points_rerun_when_the_base_config_changes(tmp_path, capsys):
    path = _write_sweep(tmp_path)
    sweep = load_sweep(path)
    run_sweep(sweep, progress=False, report=False)
    again = run_sweep(sweep, progress=False, report=False)
    assert again["ran"] == 1 and again["skipped_done"] == 3  # only the failing point
    (tmp_path / "base.yaml").write_text("objective: ls\nepochs: 3\noptim:\n  warmup_epochs: 1\n")  # other config
    changed = run_sweep(sweep, report=False)
    assert changed["ran"] == 4 and changed["skipped_done"] == 0
    assert "3 point(s) done before with another config" in capsys.readouterr().out


# A stand-in run notebook for GPU sweeps: records the CUDA_VISIBLE_DEVICES its kernel inherited and
# its worker (the kernel's parent), after waiting until another worker's point runs on another GPU,
# so one worker cannot take every point.
GPU_NOTEBOOK = SWEEP_PARAMETERS + textwrap.dedent('''\
    # %%
    import os, time
    from pathlib import Path
    from study.evaluation.results import append_rows
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    markers = Path(config).parent / "gpu-markers"
    markers.mkdir(exist_ok=True)
    (markers / gpu).touch()
    deadline = time.time() + 60
    while len(list(markers.iterdir())) < 2:
        if time.time() > deadline:
            raise RuntimeError("no second GPU in use after 60 s")
        time.sleep(0.1)
    append_rows(results, [{"point": point, "gpu": gpu, "worker": os.getppid(), "metric": "ran", "value": 1.0}])
''')


def _gpu_sweep(tmp_path: Path, gpus: str) -> Path:
    path = _write_sweep(tmp_path)
    (tmp_path / "gpu_run.py").write_text(GPU_NOTEBOOK)
    path.write_text(path.read_text().replace("run_notebook: run.py", "run_notebook: gpu_run.py")
                    + f"gpus: {gpus}\n")
    return path


def test_each_worker_runs_its_points_on_a_gpu_of_its_own(tmp_path, monkeypatch):
    import json

    # a scheduler's allocation: the sweep's indices 0 and 1 are the node's GPUs 5 and 7
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    summary = run_sweep(load_sweep(_gpu_sweep(tmp_path, "[0, 1]")), progress=False, report=False)
    assert summary["ran"] == 4 and not summary["failed"], summary
    table = pd.read_csv(tmp_path / "results.csv", dtype={"gpu": str})
    assert sorted(table.gpu.unique()) == ["5", "7"]  # parallel defaulted to one worker per GPU
    gpu_of_worker = table.groupby("worker").gpu.unique()
    assert len(gpu_of_worker) == 2 and all(len(g) == 1 for g in gpu_of_worker)  # a worker keeps its GPU
    for row in table.itertuples():
        done = json.loads((tmp_path / "runs" / "tiny" / row.point / "done.json").read_text())
        assert done["gpu"] == row.gpu


def test_more_workers_than_gpus_is_an_error_before_any_work(tmp_path, monkeypatch):
    from study.utils.errors import UserError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    sweep = load_sweep(_gpu_sweep(tmp_path, "[0, 1]"))
    with pytest.raises(UserError, match=r"^parallel 3 is more than the 2 GPU\(s\) in gpus.*gpus: \[0, 0, 1, 1\]"):
        run_sweep(sweep, parallel=3, progress=False)
    sweep.parallel = 3
    with pytest.raises(UserError, match="parallel 3"):
        run_sweep(sweep, progress=False)
    assert not (tmp_path / "runs").exists()


def test_gpu_lists_resolve_against_the_visible_gpus(tmp_path, monkeypatch):
    from study.utils.errors import UserError
    from study.studies.workers import resolve_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,6")
    assert resolve_gpus(None) is None
    assert resolve_gpus("auto") == ["2", "3", "6"]
    assert resolve_gpus([2, 0]) == ["6", "2"]
    assert resolve_gpus("0,0,1") == ["2", "2", "3"]  # a GPU listed twice is shared by two workers
    with pytest.raises(UserError, match="3 GPU"):
        resolve_gpus([3])
    with pytest.raises(UserError, match="GPU indices"):
        resolve_gpus("first")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match="no GPU is visible"):
        resolve_gpus("auto")
    path = _write_sweep(tmp_path)
    path.write_text(path.read_text() + "gpus: all\n")
    with pytest.raises(ConfigError, match="gpus must be 'auto' or a non-empty list"):
        load_sweep(path)


def _objective_sweep(tmp_path: Path, extra: str = "") -> Path:
    path = _write_sweep(tmp_path)
    path.write_text(path.read_text().replace("grid:\n  mask.ratio: [0.5, 0.9]\n",
                                             "grid:\n  objective: [ls, cimle]\n  mask.ratio: [0.5, 0.9]\n")
                    + extra)
    return path


def _record_parameters(monkeypatch) -> dict:
    """Run points in this process without a kernel; returns {point: the run notebook's parameters}."""
    import study.studies.points

    from study.evaluation.results import append_rows

    seen = {}

    def execute(source, output, params, cwd):
        seen[params["point"]] = params
        append_rows(params["results"], [{"point": params["point"], "metric": "ran", "value": 1.0}])

    monkeypatch.setattr(study.studies.points, "execute_notebook", execute)
    return seen


def test_random_baseline_once_per_seed_goes_to_the_first_point_of_each_seed(tmp_path, monkeypatch):
    sweep = load_sweep(_objective_sweep(tmp_path, "random_baseline: once_per_seed\n"))
    points = expand(sweep)
    chosen = [p for p in points if p.random_baseline]
    assert len(points) == 8 and all(p.random_baseline is not None for p in points)
    assert [(p.seed, p.overrides) for p in chosen] == [
        (0, ["objective=ls", "mask.ratio=0.5", "seed=0"]), (1, ["objective=ls", "mask.ratio=0.5", "seed=1"])]

    seen = _record_parameters(monkeypatch)
    run_sweep(sweep, progress=False, report=False)
    assert {slug for slug, params in seen.items() if params["random_baseline"]} == {p.slug for p in chosen}
    assert sum(params["random_baseline"] is False for params in seen.values()) == 6

    # the chosen points done, the others to rerun: none of the rerun points takes the baseline over
    for point in points:
        if not point.random_baseline:
            (tmp_path / "runs" / "tiny" / point.slug / "done.json").unlink()
    seen.clear()
    again = run_sweep(sweep, progress=False, report=False)
    assert again["ran"] == 6 and len(seen) == 6
    assert not any(params["random_baseline"] for params in seen.values())


def test_without_random_baseline_the_notebook_keeps_its_own_rule(tmp_path, monkeypatch):
    sweep = load_sweep(_objective_sweep(tmp_path))
    assert all(p.random_baseline is None for p in expand(sweep))
    seen = _record_parameters(monkeypatch)
    run_sweep(sweep, progress=False, report=False)
    assert len(seen) == 8 and not any("random_baseline" in params for params in seen.values())


def test_random_baseline_rules_are_checked(tmp_path):
    path = _objective_sweep(tmp_path, "random_baseline: always\n")
    with pytest.raises(ConfigError, match=r"random_baseline must be one of \['once_per_seed'\]"):
        load_sweep(path)
    path = _objective_sweep(tmp_path, "random_baseline: once_per_seed\nparameters:\n  random_baseline: true\n")
    with pytest.raises(ConfigError, match="both at the top level and in parameters"):
        load_sweep(path)


def test_points_with_another_encoder_get_their_own_random_baseline(tmp_path):
    path = _write_sweep(tmp_path)
    path.write_text(path.read_text().replace("grid:\n  mask.ratio: [0.5, 0.9]\n",
                                             "grid:\n  model.depth: [2, 3]\n  mask.ratio: [0.5, 0.9]\n")
                    + "random_baseline: once_per_seed\n")
    chosen = [p.overrides for p in expand(load_sweep(path)) if p.random_baseline]
    assert chosen == [["model.depth=2", "mask.ratio=0.5", f"seed={s}"] for s in (0, 1)] + \
        [["model.depth=3", "mask.ratio=0.5", f"seed={s}"] for s in (0, 1)]


def test_a_done_point_without_rows_in_the_table_runs_again_and_its_rows_return(tmp_path, capsys):
    """A run with --prune of a smaller grid drops the rows of the points it lacks; their done markers stay."""
    sweep = load_sweep(_write_sweep(tmp_path))
    run_sweep(sweep, progress=False, report=False)
    table = pd.read_csv(tmp_path / "results.csv")
    dropped = sorted(table.point)[-1]
    table[table.point != dropped].to_csv(tmp_path / "results.csv", index=False)
    again = run_sweep(sweep, report=False)
    assert dropped in set(pd.read_csv(tmp_path / "results.csv").point)
    assert again["skipped_done"] == 3 and again["ran"] == 1  # merged from the point's rows; the failing one runs
    assert "1 point(s) had ended without their rows in results.csv: merged them" in capsys.readouterr().out
    (tmp_path / "runs" / "tiny" / dropped / "rows.csv").unlink()  # a point folder without its rows file
    table = pd.read_csv(tmp_path / "results.csv")
    table[table.point != dropped].to_csv(tmp_path / "results.csv", index=False)
    again = run_sweep(sweep, report=False)
    assert dropped in set(pd.read_csv(tmp_path / "results.csv").point)
    assert again["skipped_done"] == 2 and again["ran"] == 2  # the dropped point and the failing one
    assert "1 point(s) done before but without rows" in capsys.readouterr().out


def test_a_run_of_some_seeds_runs_only_theirs_and_keeps_the_others_rows(tmp_path):
    sweep = load_sweep(_write_sweep(tmp_path))
    first = run_sweep(sweep, progress=False, report=False, seeds=[0])
    assert first["ran"] == 2 and not first["failed"]
    runs_dir = tmp_path / "runs" / "tiny"
    assert sorted(int(p.name.split("_s")[1][0]) for p in runs_dir.iterdir()) == [0, 0]
    second = run_sweep(sweep, progress=False, report=False, seeds=[1])
    assert second["ran"] == 2 and second["skipped_done"] == 2 and len(second["failed"]) == 1
    assert second["stale_rows_dropped"] == 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == 3  # seed 0's two rows kept, seed 1's one
    with pytest.raises(UserError, match=r"seeds \[7\] are not in tiny's seeds"):
        run_sweep(sweep, progress=False, report=False, seeds=[1, 7])


def test_a_run_of_only_some_values_runs_only_their_points_and_keeps_the_others_rows(tmp_path, capsys):
    """After a change to one objective's code, a fresh checkout reruns that objective's points alone."""
    from study.cli import main

    sweep = load_sweep(_write_sweep(tmp_path))
    first = run_sweep(sweep, progress=False, report=False, only=[("mask.ratio", 0.5)])
    assert first["ran"] == 2 and not first["failed"]
    assert set(pd.read_csv(tmp_path / "results.csv").mask_ratio) == {0.5}
    # a fresh checkout: the committed rows, no done markers; rerun the 0.9 points of seed 0 only
    shutil.rmtree(tmp_path / "runs")
    again = run_sweep(sweep, progress=False, report=False, seeds=[0], only=[("mask.ratio", 0.9)])
    assert again["ran"] == 1 and again["stale_rows_dropped"] == 0
    table = pd.read_csv(tmp_path / "results.csv")
    assert sorted(table.mask_ratio) == [0.5, 0.5, 0.9]  # the 0.5 rows kept, the 0.9 one added
    assert [p.name.split("_")[0] for p in (tmp_path / "runs" / "tiny").iterdir()] == ["0.9"]
    with pytest.raises(UserError, match=r"no point has mask.ratio=0.7; its points have mask.ratio in 0.5, 0.9"):
        run_sweep(sweep, progress=False, report=False, only=[("mask.ratio", 0.7)])
    with pytest.raises(UserError, match="--only mask.ratios: not a config key"):
        run_sweep(sweep, progress=False, report=False, only=[("mask.ratios", 0.5)])
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--only", "objective"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "KEY=VALUE" in err and len(err.strip().splitlines()) == 1
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--only", "objective=mvae"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no point has objective='mvae'; its points have objective in 'ls'\n"


def test_the_seeds_flag_rejects_a_bad_list_in_one_line(tmp_path, capsys):
    from study.cli import main

    assert main(["sweep", str(_write_sweep(tmp_path)), "--seeds", "3,x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "3,x" in err and len(err.strip().splitlines()) == 1


ORDER_NOTEBOOK = SWEEP_PARAMETERS + textwrap.dedent('''\
    # %%
    from pathlib import Path
    from study.evaluation.results import append_rows
    with open(Path(config).parent / "order.txt", "a") as log:
        log.write(sweep + "/" + point + "\\n")
    append_rows(results, [{"point": point, "train_seconds": 1.0, "metric": "ran", "value": 1.0}])
''')


def test_several_sweeps_share_one_pool_longest_recorded_point_first(tmp_path):
    from study.studies.sweep import run_sweeps

    (tmp_path / "order_run.py").write_text(ORDER_NOTEBOOK)
    sweeps = []
    for name in ("first", "second"):
        path = _write_sweep(tmp_path)
        text = path.read_text().replace("name: tiny", f"name: {name}").replace("results.csv", f"{name}.csv")
        (tmp_path / f"{name}.yaml").write_text(text.replace("run_notebook: run.py", "run_notebook: order_run.py")
                                              + "parallel: 1\n")
        sweeps.append(load_sweep(tmp_path / f"{name}.yaml"))
    points = {s.name: [p.slug for p in expand(s)] for s in sweeps}
    # the last run's times: the second sweep's last point took longest; one point of the first has no record
    recorded = {"first": [5.0, 1.0, 30.0, None], "second": [2.0, 3.0, 4.0, 60.0]}
    for name, times in recorded.items():
        rows = [{"point": slug, "train_seconds": sec, "metric": "knn_seconds", "value": 0.5, "sweep": "old"}
                for slug, sec in zip(points[name], times) if sec is not None]
        pd.DataFrame(rows).to_csv(tmp_path / f"{name}.csv", index=False)
    summaries = run_sweeps(sweeps, progress=False, report=False)
    assert [s["ran"] for s in summaries] == [4, 4] and not any(s["failed"] for s in summaries)
    order = (tmp_path / "order.txt").read_text().split()
    expected = [("first", 3), ("second", 3), ("first", 2), ("first", 0), ("second", 2), ("second", 1),
                ("second", 0), ("first", 1)]
    assert order == [f"{name}/{points[name][i]}" for name, i in expected]
    for name in ("first", "second"):  # each sweep's rows in its own table
        table = pd.read_csv(tmp_path / f"{name}.csv")
        assert set(points[name]) <= set(table.point)


def test_a_missing_notebook_fails_at_load_naming_where_it_was_looked_for(tmp_path):
    import re

    path = _write_sweep(tmp_path)
    for name, key in (("report.py", "report_notebook"), ("run.py", "run_notebook")):
        (tmp_path / name).rename(tmp_path / f"{name}.away")
        with pytest.raises(ConfigError, match=re.escape(f"{key} {name} not found (looked for {tmp_path / name}")):
            load_sweep(path)
        (tmp_path / f"{name}.away").rename(tmp_path / name)
    (tmp_path / "run.py").unlink()
    assert load_sweep(path, report_only=True).run_notebook == "run.py"  # a report runs no point
    assert not (tmp_path / "runs").exists()


def test_relative_paths_resolve_against_the_folder_above_experiments(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "experiments" / "sweeps").mkdir(parents=True)
    (repo / "run.py").write_text(RUN_NOTEBOOK)
    (repo / "base.yaml").write_text("objective: ls\n")
    sweep_file = repo / "experiments" / "sweeps" / "tiny.yaml"
    sweep_file.write_text("name: tiny\nconfig: base.yaml\nrun_notebook: run.py\nresults: results/tiny.csv\n"
                          "grid:\n  mask.ratio: [0.5]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sweep = load_sweep(sweep_file)
    assert sweep.path(sweep.results) == repo / "results" / "tiny.csv"
    assert load_sweep(Path("../repo/experiments/sweeps/tiny.yaml")).path("base.yaml") == repo / "base.yaml"
    # no experiments/ above the file: the working directory, and a message that says where it looked
    shutil.copy(sweep_file, elsewhere / "tiny.yaml")
    with pytest.raises(ConfigError, match=f"looked for {elsewhere / 'base.yaml'}.*set root:"):
        load_sweep(elsewhere / "tiny.yaml")
