"""``submit``: refuses without SLURM (no untracked local processes), logs under --out, --local runs one process."""

import os
import time
from pathlib import Path

from conftest import as_sets
from study.cli import main as cli_main

TINY = [
    "data.name=synthetic", "data.synthetic_classes=2", "data.synthetic_per_class=20", "data.augment=false",
    "model.img_size=8", "model.patch_size=4", "model.embed_dim=8", "model.depth=1", "model.num_heads=2",
    "model.decoder_dim=8", "model.decoder_depth=1", "model.decoder_heads=2",
    "optim.batch_size=8", "optim.warmup_epochs=1", "noise.dim=4", "cimle.k=2", "mask.ratio=0.5", "epochs=1",
]
SETS = as_sets(TINY)


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


def test_with_slurm_the_job_is_handed_to_sbatch_and_logs_go_under_out(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin"
    fake.mkdir()
    for cmd in ("sbatch", "srun"):  # a stand-in SLURM that records the submission
        (fake / cmd).write_text(f'#!/bin/sh\necho "$@" > "{fake}/{cmd}.args"\necho "Submitted batch job 4242"\n')
        (fake / cmd).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert cli_main(["submit", "--out", str(out), *SETS]) == 0
    assert f"submitted job 4242; logs in {out}/slurm/4242" in capsys.readouterr().out
    script = Path((fake / "sbatch.args").read_text().split()[-1])
    assert script.parent == out / "slurm" and "#SBATCH --gpus-per-node=8" in script.read_text()
    assert not (tmp_path / "slurm_logs").exists()


def test_local_runs_one_process_in_the_foreground(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "run"
    assert cli_main(["submit", "--local", "--out", str(out), *SETS]) == 0
    assert (out / "checkpoint.pt").is_file()
    assert _processes_mentioning(str(out)) == []
