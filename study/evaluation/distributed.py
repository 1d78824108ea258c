"""Finetuning under torchrun: one process per GPU (gloo on CPU), as pretraining runs.

``evaluate`` joins the process group torchrun describes; the finetune protocol then
splits its global batch evenly (:func:`per_process_batch`), wraps the classifier in
DDP, shards the training set with ``DistributedSampler`` and the validation set
without padding (:func:`shard`), and sums the correct counts over the processes, so
its top-1 is the one-process top-1 of the same model. Only rank 0 prints and writes
rows. k-NN, the linear probe and the decoder protocols stay one-process and are
refused under torchrun (:func:`check_torchrun_protocols`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch
import torch.distributed as tdist
from torch.utils.data import Dataset, Subset

from study.evaluation.setup import EvaluationError
from study.utils.device import Dist, init_distributed

__all__ = ["TORCHRUN_PROTOCOLS", "torchrun_world", "check_torchrun_protocols", "join", "join_evaluation",
           "per_process_batch", "shard", "sum_over_processes", "wrap"]

TORCHRUN_PROTOCOLS = ("finetune",)


def torchrun_world() -> int:
    """The processes torchrun started (1 under a plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_torchrun_protocols(protocols: Sequence[str], world: int) -> None:
    """Refuse, before any work, a protocol other than finetune in a job of several processes.

    Refused rather than run on rank 0 alone: the other GPUs would sit idle, waiting at a barrier
    whose timeout (30 min by default) a full-size linear probe can outlast, which kills the job after
    the work is done. Two commands, one plain and one under torchrun, say what runs where.
    """
    other = [p for p in protocols if p not in TORCHRUN_PROTOCOLS]
    if world > 1 and other:
        raise EvaluationError(f"under torchrun ({world} processes) evaluate runs only --protocols finetune; run "
                              f"{','.join(other)} without torchrun: 'python -m study evaluate --protocols "
                              f"{','.join(other)} ...' (one process)")


def join(device_kind: str) -> Dist:
    """This process's place: the torchrun process group (nccl on CUDA, else gloo), or a world of one.

    On CUDA each process makes its own GPU (``LOCAL_RANK``) the current one, where NCCL puts its work.
    """
    dist = init_distributed(device_kind)
    if dist.world > 1 and device_kind == "cuda":
        torch.cuda.set_device(dist.local_rank)
    return dist


def join_evaluation(device_kind: str, settings, results):
    """:func:`join`, and the evaluate settings and results table of this process: every process runs the
    same protocol code, but only rank 0 shows progress, prints and writes rows (``results`` None elsewhere)."""
    dist = join(device_kind)
    if dist.main:
        return dist, settings, results
    return dist, dataclasses.replace(settings, progress=False, verbose=False), None


def per_process_batch(batch_size: int, world: int) -> int:
    """``batch_size`` is the global batch, split evenly: ``batch_size / world`` images per process."""
    if batch_size % world:
        raise EvaluationError(f"finetune batch_size {batch_size} does not split evenly over {world} processes; "
                              f"give a multiple of {world}, e.g. {max(world, batch_size // world * world)}")
    return batch_size // world


def shard(dataset: Dataset, dist: Dist) -> Dataset:
    """Every ``world``-th image from ``rank``: each image in exactly one shard.

    Not a ``DistributedSampler``: it pads the last shard with repeated images, which would count
    them twice in the accuracy.
    """
    if dist.world == 1:
        return dataset
    return Subset(dataset, range(dist.rank, len(dataset), dist.world))


def sum_over_processes(values: Sequence[float], device: torch.device, dist: Dist) -> list[float]:
    """The element-wise sum of ``values`` over every process (the values themselves in a world of one)."""
    if dist.world == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def wrap(model: torch.nn.Module, device: torch.device, dist: Dist) -> torch.nn.Module:
    """``model`` in DDP across the processes (which start from rank 0's weights), or as it is alone."""
    if dist.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
