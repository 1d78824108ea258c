"""The end of an epoch without a checkpoint costs no fsync and no hash; the final checkpoint keeps its record."""

import os

import torch

from conftest import tiny_overrides
from study.config import load_config
from study.train.checkpoint import INTEGRITY, load_checkpoint
from study.train.loop import pretrain


def test_only_checkpoint_epochs_sync_metrics_and_only_the_last_is_hashed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides("epochs=3", "checkpoint_every=2", "device=cpu"))
    synced, records = [], []
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            synced.append(sum(1 for _ in open(out / "metrics.jsonl")))
        real_fsync(fd)

    def hook(epoch, model, row):  # runs before the epoch's checkpoint: sees the one of the epoch before
        if (out / "checkpoint.pt").exists():
            records.append(INTEGRITY in torch.load(out / "checkpoint.pt", weights_only=True))
        return {}

    monkeypatch.setattr(os, "fsync", fsync)
    pretrain(cfg, out, progress=False, epoch_hooks=[hook])
    assert synced == [2, 3]  # the rows of the checkpoint epochs 2 and 3, not epoch 1's
    assert records == [False]  # epoch 2's checkpoint, seen during epoch 3
    assert INTEGRITY in torch.load(out / "checkpoint.pt", weights_only=True)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
