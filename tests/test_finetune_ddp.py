"""Finetuning under torchrun: 2 CPU processes on gloo write the rows once, with a top-1 each.

The sharded validation count is checked against one process's on the same model, the global batch's
split and the protocols refused under torchrun in-process, without starting one.
"""

import os
import subprocess

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

import study.evaluation.finetune as ft
from conftest import tiny_overrides
from study.config import config_to_dict, load_config
from study.evaluation.distributed import per_process_batch, shard
from study.evaluation.finetune import ViTClassifier
from study.evaluation.run import evaluate
from study.evaluation.setup import EvaluationError
from study.methods.model import build_model
from study.models.encoder import ViTEncoder
from study.utils.device import Dist
from test_ddp import TORCHRUN


def _checkpoint(tmp_path):
    cfg = load_config(None, tiny_overrides("device=cpu", "data.num_workers=1"))
    torch.manual_seed(123)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg), "epoch": 0}, path)
    return path


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_torchrun_finetune_two_processes_writes_its_rows_once(tmp_path):
    results = tmp_path / "results.csv"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "study", "evaluate", "--checkpoint",
           str(_checkpoint(tmp_path)), "--protocols", "finetune", "--preset", "cpu", "--finetune-epochs", "2",
           "--finetune-max-steps", "3", "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("rows ->") == 1 and proc.stdout.count("finetune_top1") == 1, proc.stdout  # rank 0 only
    table = pd.read_csv(results)
    top1 = table[table.metric == "finetune_top1"]
    assert sorted(top1.encoder) == ["pretrained", "random"]
    assert len(table) == 4 and set(table.finetune_processes) == {2}
    assert all(0 <= v <= 1 for v in top1.value)


def test_the_validation_shards_count_each_image_once_and_sum_to_one_process(monkeypatch):
    torch.manual_seed(0)
    encoder = ViTEncoder(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    model = ViTClassifier(encoder, 3)
    val = TensorDataset(torch.randn(23, 1, 8, 8), torch.arange(23) % 3)
    one = ft._evaluate(model, val, 8, "cpu", 0, "fp32")
    counts = []
    monkeypatch.setattr(ft, "sum_over_processes", lambda values, device, dist: counts.append(values) or values)
    for rank in range(3):
        ft._evaluate(model, val, 8, "cpu", 0, "fp32", Dist(rank=rank, world=3))
    assert sorted(i for r in range(3) for i in shard(val, Dist(rank=r, world=3)).indices) == list(range(23))
    correct, total = map(sum, zip(*counts))
    assert total == 23 and correct / total == one


def test_the_global_batch_splits_evenly_or_is_refused(tmp_path, monkeypatch):
    assert per_process_batch(64, 1) == 64 and per_process_batch(64, 2) == 32
    with pytest.raises(EvaluationError, match="does not split evenly over 3 processes; give a multiple of 3"):
        per_process_batch(64, 3)
    # under torchrun, the single-process protocols are refused before any work, in one line
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(EvaluationError, match="run knn,linear without torchrun") as info:
        evaluate(tmp_path / "no-such-checkpoint.pt", "knn,linear,finetune", None)
    assert "\n" not in str(info.value)
