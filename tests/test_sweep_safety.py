"""A sweep never loses a committed row: not to Ctrl-C, SIGTERM, a failed point, or an edited copy of it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from conftest import SWEEP_PARAMETERS
from study.config import ConfigError
from study.studies.sweep import expand, load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]

# A stand-in run notebook: records its kernel's pid, waits while HOLD_POINTS is set (so a signal lands
# mid-point), fails at ratio 0.9 seed 1 when FAIL_AT is set, then writes its point's rows.
RUN_NOTEBOOK = SWEEP_PARAMETERS + textwrap.dedent('''\
    # %%
    import os, time
    from pathlib import Path
    from study.evaluation.results import append_rows
    (Path(config).parent / "kernels").mkdir(exist_ok=True)
    (Path(config).parent / "kernels" / str(os.getpid())).touch()
    while os.environ.get("HOLD_POINTS"):
        time.sleep(0.2)
    ratio = [o for o in overrides if o.startswith("mask.ratio=")][0].split("=")[1]
    append_rows(results, [{"point": point, "metric": "knn_top1", "value": 1.0}])
    if os.environ.get("FAIL_AT") and ratio == "0.9" and "seed=1" in overrides:
        raise RuntimeError("boom")
    append_rows(results, [{"point": point, "metric": "linear_top1", "value": 1.0}])
''')


def _sweep(tmp_path: Path, grid: str = "mask.ratio: [0.5, 0.9]") -> Path:
    (tmp_path / "run.py").write_text(RUN_NOTEBOOK)
    (tmp_path / "base.yaml").write_text("objective: ls\n")
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent(f'''\
        name: tiny
        config: base.yaml
        run_notebook: run.py
        results: results/tiny.csv
        runs_dir: runs
        seeds: [0, 1]
        root: {tmp_path}
    ''') + f"grid:\n  {grid}\n")
    return tmp_path / "sweep.yaml"


def _committed_rows(tmp_path: Path, sweep_path: Path) -> bytes:
    """A table holding rows of every point (value 0.5), as a committed table does; returns its bytes."""
    rows = [{"sweep": "tiny", "point": p.slug, "metric": m, "value": 0.5}
            for p in expand(load_sweep(sweep_path)) for m in ("knn_top1", "linear_top1")]
    (tmp_path / "results").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(tmp_path / "results" / "tiny.csv", index=False)
    return (tmp_path / "results" / "tiny.csv").read_bytes()


def _kernels(tmp_path: Path) -> list[int]:
    folder = tmp_path / "kernels"
    return [int(p.name) for p in folder.iterdir()] if folder.exists() else []


def _start(tmp_path: Path, *args: str, hold: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HOLD_POINTS", None)
    if hold:
        env["HOLD_POINTS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "study", "sweep", str(tmp_path / "sweep.yaml"), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_kernels(tmp_path: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while len(_kernels(tmp_path)) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no point started within 120 s"
        time.sleep(0.2)


@pytest.mark.parametrize("sig, parallel, status", [(signal.SIGINT, "1", 130), (signal.SIGTERM, "2", 143)])
def test_a_signal_mid_point_keeps_every_committed_row_and_the_rerun_resumes(tmp_path, sig, parallel, status):
    path = _sweep(tmp_path)
    before = _committed_rows(tmp_path, path)
    semaphores = set(Path("/dev/shm").glob("sem.*"))
    proc = _start(tmp_path, "--parallel", parallel, hold=True)
    _wait_for_kernels(tmp_path, int(parallel), proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, (out, err)
    assert err.startswith("error: sweep stopped by ") and "run the same command again to resume" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "results" / "tiny.csv").read_bytes() == before
    time.sleep(0.5)
    assert not [pid for pid in _kernels(tmp_path) if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "a point's kernel outlived the sweep"
    assert set(Path("/dev/shm").glob("sem.*")) <= semaphores, "the pool left a semaphore behind"

    rerun = _start(tmp_path, "--parallel", parallel, hold=False)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, (out, err)
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert len(table) == 8 and not table.duplicated(["point", "metric"]).any()
    assert set(table.value) == {1.0}  # every point's committed rows replaced by its new ones, once


def test_a_failed_point_keeps_its_committed_rows(tmp_path, monkeypatch):
    path = _sweep(tmp_path)
    _committed_rows(tmp_path, path)
    monkeypatch.setenv("FAIL_AT", "1")
    summary = run_sweep(load_sweep(path), progress=False, report=False)
    (failed,) = summary["failed"]
    assert "kept its rows in the table" in summary["failed"][failed]
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert len(table) == 8 and not table.duplicated(["point", "metric"]).any()
    assert set(table[table.point == failed].value) == {0.5}  # not the failed run's one new row
    assert set(table[table.point != failed].value) == {1.0}
    # with no committed rows, a failed point's rows (the protocols before the failure) are added
    (tmp_path / "results" / "tiny.csv").unlink()
    shutil.rmtree(tmp_path / "runs")
    run_sweep(load_sweep(path), progress=False, report=False)
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert list(table[table.point == failed].metric) == ["knn_top1"]


def test_a_point_evaluated_but_not_merged_is_merged_on_the_next_run(tmp_path):
    """Stopped between a point's end and the merge: the rerun merges its rows without running it again."""
    path = _sweep(tmp_path)
    sweep = load_sweep(path)
    run_sweep(sweep, progress=False, report=False)
    point = expand(sweep)[0]
    folder = tmp_path / "runs" / "tiny" / point.slug
    os.replace(folder / "done.json", folder / "evaluated.json")
    rows = pd.read_csv(folder / "rows.csv").assign(value=2.0)
    rows.to_csv(folder / "rows.csv", index=False)
    again = run_sweep(sweep, progress=False, report=False)
    assert again["ran"] == 0 and (folder / "done.json").exists()
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert set(table[table.point == point.slug].value) == {2.0} and len(table) == 8


def _git(tmp_path: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_shrunken_copy_of_a_shipped_sweep_leaves_the_committed_table_alone(tmp_path, capsys):
    path = _sweep(tmp_path)
    before = _committed_rows(tmp_path, path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "sweep.yaml", "results/tiny.csv")
    _git(tmp_path, "commit", "-qm", "shipped")
    copy = tmp_path / "mine.yaml"
    copy.write_text(path.read_text().replace("seeds: [0, 1]", "seeds: [0]"))  # same name and table, fewer points
    summary = run_sweep(load_sweep(copy), progress=False, report=False)
    assert "is not a committed sweep file, so it writes runs/tiny/results.csv" in capsys.readouterr().out
    assert summary["ran"] == 2 and (tmp_path / "results" / "tiny.csv").read_bytes() == before
    assert len(pd.read_csv(tmp_path / "runs" / "tiny" / "results.csv")) == 4
    # on purpose, it writes the committed table, and still keeps the rows of the points it lacks
    run_sweep(load_sweep(copy, write_committed=True), progress=False, report=False)
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert len(table) == 8 and sorted(table.value) == [0.5] * 4 + [1.0] * 4


def test_a_grid_with_a_point_twice_is_refused(tmp_path):
    path = _sweep(tmp_path, grid="mask.ratio: [0.5, 0.5]")
    with pytest.raises(ConfigError, match="has the point .*mask.ratio=0.5.* twice"):
        expand(load_sweep(path))
    path = _sweep(tmp_path, grid="objective: [ls, ls]")
    with pytest.raises(ConfigError, match="twice"):
        expand(load_sweep(path))
    assert not (tmp_path / "runs").exists()


def test_a_sweep_file_with_overlapping_sub_grids_is_refused_in_one_line(tmp_path, capsys):
    from study.cli import main

    path = _sweep(tmp_path, grid="- {mask.ratio: [0.5, 0.9]}\n  - {mask.ratio: [0.9]}")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "twice" in err and len(err.strip().splitlines()) == 1
    assert json.dumps(sorted(os.listdir(tmp_path))) == json.dumps(sorted(["base.yaml", "run.py", "sweep.yaml"]))


def test_a_points_fingerprint_covers_only_what_differs_from_the_defaults():
    """A new config field whose default keeps the old behaviour must not make every done point run again."""
    from study.config import load_config
    from study.studies.sweep import _digest, _fingerprint

    assert _fingerprint(load_config(None, ["epochs=30", "mask.ratio=0.9"])) == _digest(
        {"epochs": 30, "mask": {"ratio": 0.9}})
    assert _fingerprint(load_config(None, [])) == _digest({})


def test_a_kernel_that_dies_before_it_starts_is_started_again(tmp_path, monkeypatch):
    """Parallel points can pick the same free port for their kernels; the loser dies before any cell runs."""
    import papermill

    from study.studies import notebook

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Kernel died before replying to kernel_info")

    monkeypatch.setattr(papermill, "execute_notebook", flaky)
    (tmp_path / "nb.py").write_text(RUN_NOTEBOOK)
    notebook.execute_notebook(tmp_path / "nb.py", tmp_path / "out.ipynb", {}, cwd=tmp_path)
    assert len(calls) == 2
    calls.clear()

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("a cell failed")

    monkeypatch.setattr(papermill, "execute_notebook", broken)
    with pytest.raises(RuntimeError, match="a cell failed"):
        notebook.execute_notebook(tmp_path / "nb.py", tmp_path / "out.ipynb", {}, cwd=tmp_path)
    assert len(calls) == 1  # a failure of the notebook itself is not retried
