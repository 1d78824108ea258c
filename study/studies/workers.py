"""The workers of a sweep's pool: each its share of the cores and, when the sweep has gpus, a GPU of its own.

GPUs: a point runs on one GPU. ``gpus: [0, 1, 2, 3]`` (indices among the GPUs
this process sees) or ``gpus: auto`` (all of them) gives each worker one GPU
of its own, through ``CUDA_VISIBLE_DEVICES`` set in the worker before anything
in it, or in the kernel it starts, touches CUDA; ``parallel`` is then the number
of GPUs unless set lower, and more workers than listed GPUs is an error (a GPU
listed twice, ``[0, 0, 1, 1]``, is shared by two workers). ``done.json`` records
the GPU. A point that needs several GPUs (one data-parallel run) does not belong
in a sweep: pretrain it with torchrun or ``python -m study submit``, then run
``python -m study evaluate`` on its checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from study.config import ConfigError
from study.utils.errors import UserError

__all__ = ["check_gpus", "gpu_queue", "gpu_record", "init_worker", "resolve_gpus", "worker_count"]


def check_gpus(gpus: Any, path: Path) -> None:
    ids = isinstance(gpus, list) and gpus and all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                                                  for g in gpus)
    if gpus is not None and gpus != "auto" and not ids:
        raise ConfigError(f"{path}: gpus must be 'auto' or a non-empty list of GPU indices, e.g. [0, 1], "
                          f"not {gpus!r}")


# this worker's CUDA_VISIBLE_DEVICES, when the sweep has gpus
_WORKER_GPU: str | None = None


def _limit_threads(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def init_worker(threads: int, gpus) -> None:
    """Pool initializer: the worker's share of the cores and, given a queue of GPUs, one GPU of its own.

    It runs before the worker's first point, so before the worker or the kernels it starts (which
    inherit its environment) can initialize CUDA on another device.
    """
    global _WORKER_GPU
    _limit_threads(threads)
    if gpus is not None:
        _WORKER_GPU = gpus.get(timeout=60)  # the queue holds one GPU per worker: never empty here
        os.environ["CUDA_VISIBLE_DEVICES"] = _WORKER_GPU


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    import torch  # only here: a CPU sweep never needs it in the parent

    return [str(i) for i in range(torch.cuda.device_count())]


def resolve_gpus(spec: list[int] | str | None) -> list[str] | None:
    """``gpus`` of a sweep file (or ``--gpus``: ``auto`` or ``0,1``) as one CUDA_VISIBLE_DEVICES value per worker.

    Indices count among the GPUs this process sees, so ``[0, 1]`` under a scheduler that set
    CUDA_VISIBLE_DEVICES=4,5 means GPUs 4 and 5.
    """
    if spec is None:
        return None
    if isinstance(spec, str) and spec != "auto":
        try:
            spec = [int(g) for g in spec.split(",")]
        except ValueError:
            raise UserError(f"gpus must be 'auto' or GPU indices such as 0,1,2,3, not {spec!r}") from None
    visible = visible_gpus()
    if not visible:
        raise UserError("gpus are set but no GPU is visible (CUDA_VISIBLE_DEVICES is "
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): drop gpus to run on the CPU")
    if spec == "auto":
        return visible
    if any(not 0 <= g < len(visible) for g in spec):
        raise UserError(f"gpus {list(spec)}: {len(visible)} GPU(s) are visible, indices 0 to {len(visible) - 1}")
    return [visible[g] for g in spec]


def worker_count(parallel: int | None, gpus: list[str] | None) -> int:
    if gpus is None:
        return max(1, parallel or 1)
    workers = parallel or len(gpus)
    if workers > len(gpus):
        raise UserError(f"parallel {workers} is more than the {len(gpus)} GPU(s) in gpus: a point runs on a GPU "
                        "of its own; lower parallel, or list a GPU twice to share it (gpus: [0, 0, 1, 1])")
    return max(1, workers)


def gpu_queue(context, gpus: list[str] | None):
    if gpus is None:
        return None
    queue = context.Queue()
    for gpu in gpus:
        queue.put(gpu)
    return queue


def gpu_record() -> dict:
    return {} if _WORKER_GPU is None else {"gpu": _WORKER_GPU}
