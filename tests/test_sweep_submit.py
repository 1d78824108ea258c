"""``sweep --submit``: the points to run go to SLURM as one job array (the fake SLURM of tests/fake_slurm), each
task runs its point as the sweep would, and the next plain run merges their rows without running them again."""

import re

import pandas as pd
import submitit

import study.cli.submit as submit
from conftest import one_error_line
from test_submit import _wait_until, slurm  # noqa: F401 - slurm is the fixture
from test_sweep import _write_sweep
from study.cli import main as cli_main
from study.studies.sweep import load_sweep, run_sweep


def test_pending_points_run_as_an_array_and_the_next_run_merges_them(slurm, tmp_path, capsys):  # noqa: F811
    path = _write_sweep(tmp_path)
    assert cli_main(["sweep", str(path), "--submit", "--seeds", "0", "--account", "proj42"]) == 0
    printed = capsys.readouterr().out
    array = re.search(r"submitted array job (\d+): 2 task\(s\)", printed).group(1)
    logs = tmp_path / "runs" / "tiny" / "slurm"
    script = (logs / array / f"{array}_submission.sh").read_text().splitlines()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --account=proj42" in script

    slugs = set()
    for task in ("0", "1"):
        _wait_until((slurm / f"{array}_{task}" / "rc").is_file, f"task {task}")
        slug, error, _ = submitit.SlurmJob(folder=logs / "%j", job_id=f"{array}_{task}").result()
        assert error is None
        slugs.add(slug)
    assert all((tmp_path / "runs" / "tiny" / slug / "evaluated.json").is_file() for slug in slugs)

    summary = run_sweep(load_sweep(path), seeds=[0], report=False, progress=False)
    assert summary["ran"] == 0 and summary["skipped_done"] == 2
    assert set(pd.read_csv(tmp_path / "results.csv")["point"]) == slugs

    assert cli_main(["sweep", str(path), "--submit", "--seeds", "0"]) == 0
    assert "nothing to submit" in capsys.readouterr().out


def test_without_slurm_the_sweep_says_to_run_here(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(submit, "slurm_available", lambda: False)
    code = cli_main(["sweep", str(_write_sweep(tmp_path)), "--submit", "--seeds", "0"])
    one_error_line(capsys, code, "needs SLURM", "without --submit")
