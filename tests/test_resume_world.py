"""A run resumed on another number of processes goes on when its effective batch is kept, and is refused when not."""

import json
import os
import subprocess

import pytest

from conftest import as_sets, one_error_line, tiny_overrides
from study.cli import main as cli_main
from study.train.loop import load_checkpoint
from test_ddp import TORCHRUN

TINY = tiny_overrides("epochs=1", "optim.batch_size=4", "optim.effective_batch=8", "device=cpu")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One epoch on 2 processes: 4 images x 2 processes x 1 accumulation step."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "study", "pretrain", "--out", str(run),
           "--quiet", *as_sets(TINY)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(load_checkpoint(run / "checkpoint.pt")["rng"]) == 2
    return run


def _copy(run, tmp_path):
    subprocess.run(["cp", "-r", str(run), str(tmp_path / "run")], check=True)
    return tmp_path / "run"


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_resume_on_one_process_with_the_same_effective_batch_goes_on(two_process_run, tmp_path, capsys):
    run = _copy(two_process_run, tmp_path)
    assert cli_main(["pretrain", "--out", str(run), "--resume", *as_sets([*TINY, "epochs=2"])]) == 0
    assert "written by 2 process(es), resumed on 1" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 1 and len(state["rng"]) == 1 and state["config"]["optim"]["accum_steps"] == 2


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_resume_that_changes_the_effective_batch_is_refused(two_process_run, tmp_path, capsys):
    run = _copy(two_process_run, tmp_path)
    before = (run / "checkpoint.pt").read_bytes()
    code = cli_main(["pretrain", "--out", str(run), "--resume",
                     *as_sets([*TINY, "epochs=2", "optim.effective_batch=null"])])
    one_error_line(capsys, code, "effective batch", "from 8 (4 x 2 process(es)", "to 4 (4 x 1 process(es)",
                   "optim.effective_batch=8")
    assert (run / "checkpoint.pt").read_bytes() == before
