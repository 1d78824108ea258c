"""Room in /dev/shm for the loader's workers, checked before training starts.

A DataLoader worker hands each batch to the training process through shared memory,
``prefetch_factor`` batches per worker ahead, so a container with little /dev/shm
(docker's default is 64 MiB) dies mid-epoch with a bus error instead of a message.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from study.utils.errors import UserError

__all__ = ["SHM", "PREFETCH_FACTOR", "SharedMemoryTooSmall", "item_bytes", "loader_shm_bytes", "check_shared_memory"]

SHM = "/dev/shm"
PREFETCH_FACTOR = 2  # DataLoader's default with workers, which the training loader keeps


class SharedMemoryTooSmall(UserError, RuntimeError):
    """/dev/shm has less room than the loader's workers will fill."""


def item_bytes(item) -> int:
    """Bytes of one item's tensors and arrays; a plain number collates into an int64 or float64 element."""
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    if isinstance(item, np.ndarray):
        return item.nbytes
    if isinstance(item, (tuple, list)):
        return sum(item_bytes(part) for part in item)
    if isinstance(item, dict):
        return sum(item_bytes(part) for part in item.values())
    return 8


def loader_shm_bytes(dataset, batch_size: int, workers: int, processes: int = 1) -> int:
    """What ``processes`` loaders of ``workers`` each hold in shared memory at once: a batch per prefetch slot."""
    if workers == 0:
        return 0
    batch = item_bytes(_first_item(dataset)) * batch_size
    return batch * workers * PREFETCH_FACTOR * processes


def _first_item(dataset):
    """The dataset's first item, read without moving any global RNG: the training that follows must draw what it
    would without this check (a random crop here would shift every later draw of the run)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            # a pack is handed index lists and returns whole batches
            return dataset[[0]] if getattr(dataset, "batched", False) else dataset[0]
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def check_shared_memory(dataset, batch_size: int, workers: int, processes: int = 1, where: str = SHM) -> None:
    """Raise :class:`SharedMemoryTooSmall` when ``where`` has less free room than the loaders need."""
    if workers == 0 or not os.path.isdir(where):  # no workers, or no /dev/shm (not Linux): nothing to fill
        return
    need = loader_shm_bytes(dataset, batch_size, workers, processes)
    free = shutil.disk_usage(where).free
    if need <= free:
        return
    per = f" x {processes} processes" if processes > 1 else ""
    raise SharedMemoryTooSmall(
        f"the data loader needs about {_mib(need)} of shared memory ({workers} workers x {PREFETCH_FACTOR} "
        f"prefetched batches of {_mib(need // (workers * PREFETCH_FACTOR * processes))}{per}) and {where} has "
        f"{_mib(free)} free; lower data.num_workers (0 loads in the training process) or optim.batch_size, or "
        f"give the container more (docker run --shm-size=...)")
