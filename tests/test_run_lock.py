"""One run per folder: a second pretrain (or a --resume) into a live run's folder is refused, and the lock goes
with its holder however it ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import as_sets, one_error_line, tiny_overrides
from study.cli import main as cli_main
from study.train.run_lock import LOCK_NAME, RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_overrides("epochs=1")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start_long_run(out: Path) -> subprocess.Popen:
    """``python -m study pretrain`` that trains for far longer than the test lasts; returns once it holds the lock."""
    cmd = [sys.executable, "-m", "study", "pretrain", "--out", str(out), "--quiet",
           *as_sets(tiny_overrides("epochs=1000000", "checkpoint_every=1000000"))]
    # niced: its training loop would otherwise slow the start of the processes that compete for its folder
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.nice(19))
    deadline = time.time() + 120
    while not (out / LOCK_NAME).is_file() or not (out / LOCK_NAME).read_text().startswith(f"{proc.pid} "):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never took its lock"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


def test_second_run_and_resume_of_a_live_run_are_refused_and_sigterm_frees_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start_long_run(out)
    try:
        second = subprocess.run([sys.executable, "-m", "study", "pretrain", "--out", str(out), "--quiet",
                                 *as_sets(TINY)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        for word in (str(out), f"pid {first.pid}", "still running", f"kill {first.pid}", "--resume"):
            assert word in lines[0], lines[0]
        code = cli_main(["pretrain", "--out", str(out), "--resume", "--quiet", *as_sets(TINY)])
        one_error_line(capsys, code, "--resume", str(out), f"pid {first.pid}", "still running")
        assert first.poll() is None, "a refused run disturbed the live one"
        assert (out / LOCK_NAME).read_text().startswith(f"{first.pid} ")
    finally:
        code, err = _stop(first, signal.SIGTERM)
    assert code == 143, err  # SIGTERM ran the run's clean-up instead of killing it on the spot
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM; "), err
    assert not (out / LOCK_NAME).exists()
    with RunLock(out):  # free for the next run
        pass


def test_sigint_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    code, err = _stop(_start_long_run(out), signal.SIGINT)
    assert code == 130 and "error: interrupted" in err, err
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{dead.pid} {os.uname().nodename}\n")  # left by a run killed with SIGKILL
    assert cli_main(["pretrain", "--out", str(out), "--quiet", *as_sets(TINY)]) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / LOCK_NAME).exists()


def test_lock_is_released_when_the_run_fails(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--out", str(out), "--quiet", *as_sets(TINY)]) == 0
    code = cli_main(["pretrain", "--out", str(out), "--resume", "--quiet", *as_sets(TINY), "--set", "cimle.k=3"])
    one_error_line(capsys, code, "cimle.k")
    assert not (out / LOCK_NAME).exists()
    with RunLock(out):
        pass


def test_one_lock_per_folder_within_a_process_and_no_debris(tmp_path):
    with RunLock(tmp_path) as held:
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunLocked, match=rf"{tmp_path}.*pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        assert held.fd is not None
    assert list(tmp_path.iterdir()) == []
