"""Peak memory of one call (a training step, one cIMLE selection), the device sync and the progress log.

CPU has no allocator peak counter, so the CPU figure is torch.profiler's allocator peak above the start plus the
tensors that exist before the call; memory allocated outside PyTorch's allocator (oneDNN, MKL) is not counted."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout carries only the table."""
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_stderr_fd():
    """Silence C-level writes to fd 2: the profiler's start/stop chatter (and, without a GPU, a CUDA probe's
    ``ERROR:`` line) would read as failures in the progress log."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes live in PyTorch's CPU allocator during ``fn()`` above its start, from the running total that each
    allocation event carries; unseen frees of earlier memory can only make it overstate."""
    from torch._C._profiler import _EventType  # private API: measure_memory reports its absence

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    with quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"),
                    key=lambda e: e.start_time_ns)
    if not allocs:
        return 0
    first = allocs[0].extra_fields
    return max(0, max(e.extra_fields.total_allocated for e in allocs) - (first.total_allocated - first.alloc_size))


def _state_bytes(*objs: Any) -> int:
    """Bytes of modules' parameters and buffers, optimizers' state and plain tensors, each storage once."""
    tensors = [t for o in objs for t in ([*o.parameters(), *o.buffers()] if isinstance(o, nn.Module) else
               [v for st in o.state.values() for v in st.values()] if isinstance(o, torch.optim.Optimizer) else [o])]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, Tensor) and t.device.type != "meta"}.values())


def measure_memory(fn: Callable[[], Any], device: torch.device, *static: Any) -> tuple[dict, Any]:
    """Peak memory of one call and what it returned; ``static``: what exists before the call (CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "extra_bytes": int(peak - before), "static_bytes": int(before),
                "method": "torch.cuda.max_memory_allocated"}, out
    base, box = _state_bytes(*static), []
    try:
        extra = cpu_peak_extra_bytes(lambda: box.append(fn()))
    except Exception as exc:  # noqa: BLE001 - private profiler API; report instead of failing the run
        return {"peak_bytes": None, "extra_bytes": None, "static_bytes": None,
                "method": f"unavailable: {type(exc).__name__}: {exc}"}, (box[0] if box else fn())
    return {"peak_bytes": int(base + extra), "extra_bytes": int(extra), "static_bytes": int(base), "method":
            "torch.profiler profile_memory (CPU allocator live bytes) + weights/optimizer/input bytes"}, box[0]
