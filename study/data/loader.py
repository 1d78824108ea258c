"""The pretraining loader: built once per run, workers kept across epochs, batches that depend only on (seed, epoch).

Each epoch's order comes from ``seed * 7919 + epoch`` (or ``DistributedSampler(seed)``),
so a resumed epoch sees the same batches. A per-image transform reseeds torch's RNG
from (seed, epoch, index) in the worker that decodes the image, so the crops do not
depend on the number of workers and the workers can live for the whole run
(respawning them every epoch costs seconds of idle GPU). Datasets that crop whole
batches in the main process draw from the global RNG, which the checkpoint holds;
a dataset with ``batched = True`` (a pack) is handed whole index lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler

from study.data.image_folders import RobustImageFolder

if TYPE_CHECKING:
    from study.config import Config
    from study.utils.device import Dist

__all__ = ["TrainLoader", "item_seed"]


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one image's transform in one epoch (distinct for distinct arguments)."""
    return ((seed * 100_003 + epoch) * 2**31 + index) % 2**63


class _EpochRandomSampler(RandomSampler):
    """RandomSampler whose permutation is drawn from ``seed * 7919 + epoch``, set by :meth:`set_epoch`."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)


class _SeededBatches:
    """Batches of ``(index, seed)`` keys: the seed fixes that image's transform in this epoch."""

    def __init__(self, batches: BatchSampler, seed: int) -> None:
        self.batches = batches
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(i, item_seed(self.seed, self.epoch, i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class _SeededItems(Dataset):
    """``ds[(index, seed)]`` = ``ds[index]`` with torch's RNG seeded by ``seed`` (and restored after)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class TrainLoader:
    """One DataLoader for the whole run; :meth:`epoch` positions its sampler and returns it."""

    def __init__(self, train_set: Dataset, cfg: "Config", dist_info: "Dist", device: torch.device) -> None:
        if dist_info.world > 1:
            self.sampler = DistributedSampler(train_set, num_replicas=dist_info.world, rank=dist_info.rank,
                                              seed=cfg.seed, drop_last=True)
        else:
            self.sampler = _EpochRandomSampler(train_set, cfg.seed)
        batches = BatchSampler(self.sampler, cfg.optim.batch_size, drop_last=True)
        self.seeded = _SeededBatches(batches, cfg.seed) if isinstance(train_set, RobustImageFolder) else None
        workers = cfg.data.num_workers
        common = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        if getattr(train_set, "batched", False):
            self.loader = DataLoader(train_set, batch_size=None, sampler=batches, **common)
        elif self.seeded is not None:
            self.loader = DataLoader(_SeededItems(train_set), batch_sampler=self.seeded, **common)
        else:
            self.loader = DataLoader(train_set, batch_sampler=batches, **common)
        self.steps = len(batches)

    def epoch(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        if self.seeded is not None:
            self.seeded.epoch = epoch
        return self.loader

    def __len__(self) -> int:
        return self.steps
