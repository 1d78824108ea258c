"""Sweeps: resume runs only missing points; a failing point is reported and the others finish."""

import textwrap
from pathlib import Path

import pandas as pd
import pytest

from study.config import ConfigError
from study.sweep import expand, load_sweep, run_sweep

# A stand-in run notebook: records its point in the results table, or raises when told to.
RUN_NOTEBOOK = textwrap.dedent('''\
    # %% tags=["parameters"]
    config = ""
    overrides = []
    out = ""
    results = ""
    protocols = ""
    sweep = ""
    point = ""

    # %%
    from study.results import append_rows
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



def test_rows_of_points_no_longer_in_the_grid_are_dropped(tmp_path, capsys):
    sweep = load_sweep(_write_sweep(tmp_path))
    stale = {"metric": "knn_top1", "value": 0.1, "sweep": "tiny", "point": "an-old-point_s0_deadbeef"}
    other = {"metric": "knn_top1", "value": 0.2, "sweep": "another", "point": "x"}
    pd.DataFrame([stale, other]).to_csv(tmp_path / "results.csv", index=False)
    summary = run_sweep(sweep, progress=False, report=False)
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
    (tmp_path / "base.yaml").write_text("objective: ls\nepochs: 3\n")  # same overrides, other config
    changed = run_sweep(sweep, report=False)
    assert changed["ran"] == 4 and changed["skipped_done"] == 0
    assert "3 point(s) done before with another config" in capsys.readouterr().out
