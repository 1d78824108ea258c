"""The k-NN monitor: a long pretraining run's representation quality, every few epochs, while it trains.

The loop knows nothing of evaluation; it calls the hooks it is given after each epoch (rank 0) and logs
what they return. :func:`monitor_hooks` builds the one this package has from ``cfg.monitor``: weighted k-NN (the
protocol of :mod:`study.evaluation.knn`) on fixed random subsets of the train and validation splits, read
with the evaluation transform, so that one run's numbers are comparable from epoch to epoch.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from study.config import Config
from study.data.datasets import build_eval_datasets, fixed_subset_indices
from study.evaluation.features import default_pool, extract_features
from study.evaluation.knn import knn_accuracy
from study.train.loop import EpochHook

__all__ = ["KnnMonitor", "monitor_hooks"]


def _fixed_subset(dataset, size: int) -> Subset:
    """The same images for every run, seed and objective (all of them when the split is smaller)."""
    return Subset(dataset, fixed_subset_indices(len(dataset), min(size, len(dataset))))


class KnnMonitor:
    """``monitor(epoch, model, row)``: ``{}`` between its epochs; at them, k-NN top-1 of the encoder, its seconds
    and their share of the training time since the last reading (estimated from this epoch's ``row["seconds"]``)."""

    def __init__(self, cfg: Config) -> None:
        mon = cfg.monitor
        self.cfg, self.every, self.k = cfg, mon.knn_every, mon.k
        self.pool = mon.pool or default_pool(cfg.data.name)
        self._decoded: dict[str, TensorDataset] = {}
        self._subsets: dict[str, Subset] = {}

    def subset(self, split: str) -> Subset:
        """The split's fixed images, read at the first reading: the run's own checks (device, data) come first,
        and ranks other than 0 never read them."""
        if not self._subsets:
            mon, (train, val) = self.cfg.monitor, build_eval_datasets(self.cfg)
            self._subsets = {"train": _fixed_subset(train, mon.train_images), "val": _fixed_subset(val, mon.val_images)}
        return self._subsets[split]

    def _images(self, split: str) -> TensorDataset:
        """The split's images, decoded once and kept: decoding JPEGs at every reading would cost more than the
        encoder's forward. Kept in the dtype autocast feeds the encoder, so keeping them loses nothing."""
        if split not in self._decoded:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision, torch.float32)
            loader = DataLoader(self.subset(split), batch_size=256, num_workers=self.cfg.data.num_workers)
            imgs, labels = zip(*((x.to(dtype), torch.as_tensor(y)) for x, y in loader))
            self._decoded[split] = TensorDataset(torch.cat(imgs), torch.cat(labels))
        return self._decoded[split]

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.cfg.epochs

    def __call__(self, epoch: int, model: torch.nn.Module, row: dict) -> dict:
        if not self.due(epoch):
            return {}
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        feats = {}
        # its own RNG streams: the monitor must not move the training's (exact resume, same run with it off)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for split in ("train", "val"):
                feats[split] = extract_features(model.encoder, self._images(split), pool=self.pool, device=device,
                                                precision=self.cfg.precision, progress=False, desc=f"monitor {split}")
        (train_f, train_y), (val_f, val_y) = feats["train"], feats["val"]
        top1 = knn_accuracy(train_f, train_y, val_f, val_y, k=min(self.k, len(train_y)))
        seconds = time.perf_counter() - t0
        return {"monitor_knn_top1": top1, "monitor_seconds": seconds,
                "monitor_share": seconds / (self.every * row["seconds"]) if row.get("seconds") else None}


def monitor_hooks(cfg: Config) -> list[EpochHook]:
    """The epoch hooks ``cfg.monitor`` asks for (none when ``monitor.knn_every`` is 0)."""
    return [KnnMonitor(cfg)] if cfg.monitor.knn_every > 0 else []
