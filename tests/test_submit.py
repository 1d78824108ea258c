"""``submit``: refuses without SLURM (no untracked local processes); on SLURM the job runs, logs under --out,
resumes on a second submission and after preemption; --local runs one process.

The SLURM of these tests is tests/fake_slurm: sbatch, srun, sacct, scancel and scontrol stand-ins that run
the job on this machine with the variables of a one-node allocation, so that the job submitit writes
(``python -u -m submitit.core._submit FOLDER``) really runs ``PretrainJob``.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from conftest import as_sets, tiny_overrides
from study.cli import main as cli_main

SETS = as_sets(tiny_overrides("epochs=1"))
FAKE_SLURM = Path(__file__).parent / "fake_slurm"
JOB_TIMEOUT_S = 120


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """The fake SLURM on PATH; yields the folder of its jobs. Jobs a failing test left running are killed."""
    jobs = tmp_path / "fake_slurm_jobs"
    for name in [name for name in os.environ if name.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(name)  # the tests may run inside a real allocation: its variables are not the job's
    monkeypatch.setenv("FAKE_SLURM_STATE", str(jobs))
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's torch: one thread, as the other tests
    monkeypatch.chdir(tmp_path)
    yield jobs
    for pid_file in jobs.glob("*/pid"):
        if (pid_file.parent / "rc").exists():
            continue  # the job is over
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # fake sbatch starts each job in its own session
        except (ProcessLookupError, ValueError):
            pass


def _submit(capsys, out: Path, *args: str) -> tuple[str, str]:
    """Run ``submit`` (one task, --out OUT, ``args`` after the tiny config's); returns the job id and its print."""
    assert cli_main(["submit", "--out", str(out), "--gpus-per-node", "1", *SETS, *args]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"submitted job (\d+)", printed)
    assert found, printed
    return found.group(1), printed


def _wait_until(condition, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _result(jobs: Path, log_folder: Path, job_id: str):
    """Wait for the fake job to end; returns what ``PretrainJob`` returned, as submitit hands it back."""
    _wait_until((jobs / job_id / "rc").is_file, f"job {job_id}")
    job = submitit.SlurmJob(folder=log_folder, job_id=job_id)
    try:
        return job.result()
    except Exception as exc:  # noqa: BLE001 - the job's own logs say why it failed
        logs = f"--- stdout\n{job.stdout()}\n--- stderr\n{job.stderr()}"
        raise AssertionError(f"job {job_id} failed: {exc}\n{logs}") from exc


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_without_slurm_submit_refuses_and_starts_nothing(tmp_path, monkeypatch, capsys):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no sbatch, no srun
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code = cli_main(["submit", "--out", str(out), "--gpus-per-node", "2", *SETS])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "sbatch" in err and "pretrain" in err and "torchrun" in err
    time.sleep(0.5)  # submitit's local runner would have started its processes by now
    assert _processes_mentioning(str(tmp_path)) == []
    assert not (out / "checkpoint.pt").exists()
    assert not (tmp_path / "slurm_logs").exists()


def test_a_folder_that_holds_no_run_is_refused_before_submission(slurm, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("not a run")
    assert cli_main(["submit", "--out", str(out), *SETS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "holds no run" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["todo.txt"] and not slurm.exists()  # nothing written, no job


def test_the_submitted_job_runs_and_a_second_job_resumes_the_run(slurm, tmp_path, capsys):
    out = tmp_path / "run"
    first, printed = _submit(capsys, out)
    row = _result(slurm, out / "slurm" / "%j", first)
    assert row["epoch"] == 0 and (out / "checkpoint.pt").is_file() and _epochs(out) == [0]
    logs = out / "slurm" / first
    assert f"submitted job {first}; logs in {logs} " in printed and f"{first}_0_log.out" in printed
    assert "no checkpoint in" in (logs / f"{first}_0_log.out").read_text()
    assert "#SBATCH --gpus-per-node=1" in (logs / f"{first}_submission.sh").read_text()

    # a longer run, its logs where --slurm-folder says: the second job extends the run
    second, printed = _submit(capsys, out, "--set", "epochs=2", "--slurm-folder", str(out / "logs" / "%j"))
    row = _result(slurm, out / "logs" / "%j", second)
    assert row["epoch"] == 1 and _epochs(out) == [0, 1]
    assert f"logs in {out}/logs/{second} " in printed
    assert "extending" in (out / "logs" / second / f"{second}_0_log.out").read_text()
    assert not (out / "slurm" / second).exists() and not (tmp_path / "slurm_logs").exists()


def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(slurm, tmp_path, capsys):
    out = tmp_path / "run"
    epochs = 16  # enough that the job is still training when the signal comes
    job_id, _ = _submit(capsys, out, "--set", f"epochs={epochs}", "--set", "data.synthetic.per_class=60")
    _wait_until(lambda: (out / "checkpoint.pt").is_file() or (slurm / job_id / "rc").is_file(), "a checkpoint")
    if not (out / "checkpoint.pt").is_file():
        _result(slurm, out / "slurm" / "%j", job_id)  # says why the job failed, if it did
        pytest.fail("the job ended without writing a checkpoint")
    for sig in ("TERM", "USR2"):  # SLURM's preemption; on USR2 submitit checkpoints the job and requeues it
        subprocess.run(["scancel", job_id, "--signal", sig], check=True)

    row = _result(slurm, out / "slurm" / "%j", job_id)
    assert row["epoch"] == epochs - 1 and _epochs(out) == list(range(epochs))
    stdout = submitit.SlurmJob(folder=out / "slurm" / "%j", job_id=job_id).stdout()  # both runs append to it
    assert "no checkpoint in" in stdout and re.search(rf"resuming {re.escape(str(out))} from epoch [1-9]", stdout)
    assert "Requeued job" in stdout


def test_local_runs_one_process_in_the_foreground(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "run"
    assert cli_main(["submit", "--local", "--out", str(out), *SETS]) == 0
    assert (out / "checkpoint.pt").is_file()
    assert _processes_mentioning(str(out)) == []
