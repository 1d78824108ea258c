"""The multi-process path: ``torchrun --nproc_per_node 2`` (gloo on CPU), killed and resumed, against one process.

Both runs start from the same weights (DDP broadcasts rank 0's, seeded like
the single run) and take the same optimizer steps at the same learning rate:
a global batch of 8 (2 ranks x 4 vs 1 x 8), lr = blr x 8 / 256. What differs
is which images and masks each step sees (DistributedSampler and one mask
generator per rank), so the losses differ by sampling noise only; measured
at about 0.1% here, while a learning rate off by the world size moves the
second epoch's loss by about 10%.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from study.config import load_config
from study.train.loop import load_checkpoint, pretrain

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
TINY = [
    "data.name=synthetic", "data.synthetic.classes=2", "data.synthetic.per_class=200", "data.augment=false",
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2", "optim.warmup_epochs=1",
    "optim.blr=0.05", "noise.dim=4", "mask.ratio=0.5", "epochs=2", "device=cpu",
]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_torchrun_two_processes_killed_resumed_and_close_to_one_process(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = tmp_path / "single"
        pretrain(load_config(None, TINY + ["optim.batch_size=8"]), single, progress=False)
    finally:
        torch.set_num_threads(previous)

    run = tmp_path / "ddp"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "study", "pretrain", "--out", str(run),
           "--quiet"]
    for item in TINY + ["optim.batch_size=4"]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # killed (the whole process group: torchrun and both workers) once the first epoch's checkpoint is written
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0, "the run finished before it could be killed"

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in run.glob("*.pt")) == ["checkpoint.pt"]
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 1 and len(state["rng"]) == 2  # one RNG state per rank
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]

    ddp, one = _losses(run), _losses(single)
    assert one[1] < 0.8 * one[0]  # it learns: the comparison below is not between two untrained models
    for a, b in zip(ddp, one):
        assert a == pytest.approx(b, rel=0.02), (ddp, one)
