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


def test_failure_is_reported_and_restart_runs_only_missing(tmp_path, capsys):
    sweep = load_sweep(_write_sweep(tmp_path))
    points = expand(sweep)
    assert len(points) == 4

    first = run_sweep(sweep, progress=False)
    assert first["ran"] == 4 and len(first["failed"]) == 1
    (failed,) = first["failed"]
    assert "0.9" in failed and "boom" in first["failed"][failed]
    assert "FAILED" in capsys.readouterr().out
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


def test_variants_are_crossed_with_the_grid(tmp_path):
    path = _write_sweep(tmp_path)
    path.write_text(path.read_text().replace("grid:", "variants:\n"
                                             "  - {objective: ls}\n"
                                             "  - {objective: cimle, cimle.k: 2}\n"
                                             "grid:"))
    points = expand(load_sweep(path))
    assert len(points) == 2 * 2 * 2  # variants x ratios x seeds
    cimle = [p for p in points if "objective=cimle" in p.overrides]
    assert len(cimle) == 4 and all("cimle.k=2" in p.overrides for p in cimle)
    assert len({p.slug for p in points}) == 8
    path.write_text(path.read_text().replace("  - {objective: ls}\n", "  - objective\n"))
    with pytest.raises(ConfigError, match="variants"):
        load_sweep(path)
