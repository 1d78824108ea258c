"""Device, precision, seeding and threads, shared by every command.

Pretraining, evaluation, the benchmark and the figures all go through these, so one config means the
same thing everywhere: ``precision: bf16`` runs under bf16 autocast on CPU and CUDA alike, and a seed
seeds the same three generators.
"""

from __future__ import annotations

import os
import platform
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from study.utils.errors import UserError

__all__ = ["Dist", "init_distributed", "resolve_device", "describe_device", "host_cpu", "check_precision", "autocast",
           "grad_scaler", "seed_everything", "cpu_threads", "NoDevice", "why_no_cuda", "samples_that_fit"]


class NoDevice(UserError, RuntimeError):
    """``device: cuda`` on a machine without CUDA, or a precision the device cannot run."""


# --------------------------------------------------------------------------- processes and devices


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; a plain ``python`` run is a world of one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK): nccl on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda when there is one, else cpu; ``cuda`` without a usable one is a user error that says
    why (:func:`why_no_cuda`), so a GPU config never trains on the CPU in silence."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NoDevice(f"device=cuda but {why_no_cuda()}; to run on the CPU on purpose, --set device=cpu "
                           "(evaluate: --device cpu)")
        index = torch.device(kind).index
        return torch.device("cuda", local_rank if index is None else index)
    return torch.device(kind)


# the oldest driver each CUDA major version runs on (NVIDIA's compatibility table, Linux)
MIN_DRIVER = {12: "525", 13: "580"}


def why_no_cuda() -> str:
    """Why ``torch.cuda.is_available()`` is False here: a CPU-only torch, a driver older than the CUDA this
    torch was built for, or no GPU visible (none present, or CUDA_VISIBLE_DEVICES hides them)."""
    built = torch.version.cuda
    if built is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install the same version built for the "
                "CUDA your driver supports (docs/scale.md)")
    try:
        driver = torch._C._cuda_getDriverVersion()  # e.g. 12040 for CUDA 12.4; 0 when no driver is loaded
    except (AttributeError, RuntimeError):
        driver = 0
    major = int(built.split(".")[0])
    if driver and driver // 1000 < major:
        return (f"this torch ({torch.__version__}) is built for CUDA {built}, which needs an NVIDIA driver >= "
                f"{MIN_DRIVER.get(major, '?')}, and this machine's driver supports CUDA {driver // 1000}."
                f"{driver % 1000 // 10} only; update the driver, or install the same torch built for CUDA "
                f"{driver // 1000} (docs/scale.md)")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None:
        return f"no GPU is visible (CUDA_VISIBLE_DEVICES={hidden!r}); check the job's GPU allocation"
    return "no GPU is visible (no NVIDIA driver loaded, or no GPU on this machine)"


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu (no GPU visible)`` / ``cpu``: what a run says it trains on."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu (no GPU visible)" if not torch.cuda.is_available() else "cpu"


def host_cpu() -> dict:
    """The host CPU as /proc/cpuinfo names it (``model_name``, ``family_model``), the matrix and vector
    ``features`` that decide bf16 speed, and the vector ISA PyTorch dispatches to: hosts of the same kind
    differ (Intel with AMX, AMD without), so a timing says which one it ran on."""
    info: dict = {"model_name": platform.processor() or platform.machine(), "features": [],
                  "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last core's values
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["model_name"] = fields.get("model name", info["model_name"])
    info["family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    flags = set(fields.get("flags", "").split())
    info["features"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})
    return info


# --------------------------------------------------------------------------- precision


def samples_that_fit(k: int, bytes_per_sample: int, device: torch.device, share: float = 0.5) -> int:
    """How many of ``k`` samples of ``bytes_per_sample`` each to process at once: on CUDA as many as fit in
    ``share`` of the free memory (the rest is left to the step's other tensors and the allocator's slack),
    at least 1; elsewhere all ``k`` (a CPU run's memory is not measured here)."""
    if device.type != "cuda":
        return k
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(k, int(free * share) // max(1, bytes_per_sample)))


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, before any work, a precision the device cannot run."""
    if precision == "fp16" and device.type != "cuda":
        raise NoDevice(f"precision=fp16 needs CUDA and this run is on {describe_device(device)}; "
                       "use --set precision=bf16 or precision=fp32")


def _dtype(precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")


def autocast(precision: str, device: torch.device | str):
    """The one mixed-precision rule: fp32 runs as is; bf16 autocasts on CPU and CUDA; fp16 needs CUDA."""
    dtype = _dtype(precision)
    device = torch.device(device)
    if dtype is None:
        return nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """Loss scaling only where fp16 needs it (bf16 has fp32's exponent range)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# --------------------------------------------------------------------------- randomness and threads


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (model init and data order draw from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def cpu_threads(n: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with ``n`` intra-op threads on CPU (None or a CUDA device: unchanged)."""
    if n is None or torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
