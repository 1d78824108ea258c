"""Peak memory of one call: of a training step per variant, and of cIMLE's selection over a grid of k and chunk.

CUDA: ``torch.cuda.max_memory_allocated`` over the call. CPU: the peak of the
bytes live in PyTorch's CPU allocator during the call, from ``torch.profiler``
with ``profile_memory=True``, above the level at its start, plus the bytes of
the weights, buffers, optimizer state and inputs that exist before it (see the
package docstring for what this leaves out).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from experiments.bench.ratios import ratio
from experiments.bench.timing import log, sync

try:  # private API: without it the CPU figures are reported as unavailable instead of failing the run
    from torch._C._profiler import _EventType
except ImportError:  # pragma: no cover - depends on the torch build
    _EventType = None

__all__ = ["cpu_peak_extra_bytes", "measure_memory", "quiet_stderr_fd", "selection_memory"]


@contextlib.contextmanager
def quiet_stderr_fd():
    """Silence C-level writes to fd 2 (the profiler's start/stop chatter); Python exceptions still propagate."""
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


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes live in PyTorch's CPU allocator during ``fn()``, above the level at its start.

    From ``torch.profiler(profile_memory=True)``: every allocation and free
    event carries the allocator's running total; the peak is its maximum
    minus the total before the first event. Frees of memory allocated before
    profiling are not seen, so the figure can only overstate the true peak.
    """
    if _EventType is None:
        raise RuntimeError("torch._C._profiler._EventType is missing from this torch build")
    with quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = [e for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"]
    if not allocs:
        return 0
    allocs.sort(key=lambda e: e.start_time_ns)
    first = allocs[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return max(0, max(e.extra_fields.total_allocated for e in allocs) - base)


def _state_bytes(*objs: Any) -> int:
    """Bytes of the tensors held by modules (parameters, buffers), optimizers (state) and plain tensors."""
    seen: set[int] = set()
    total = 0

    def add(t: Tensor) -> None:
        nonlocal total
        if isinstance(t, Tensor) and t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for obj in objs:
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
        elif isinstance(obj, Tensor):
            add(obj)
    return total


def measure_memory(fn: Callable[[], Any], device: torch.device, *static: Any) -> tuple[dict, Any]:
    """Peak memory of one call of ``fn`` and what ``fn`` returned; ``static``: what exists before the call (CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "extra_bytes": int(peak - before), "static_bytes": int(before),
                "method": "torch.cuda.max_memory_allocated"}, out
    base = _state_bytes(*static)
    box: list = []
    try:
        extra = cpu_peak_extra_bytes(lambda: box.append(fn()))
    except Exception as exc:  # noqa: BLE001 - private profiler API; report instead of failing the run
        memo = {"peak_bytes": None, "extra_bytes": None, "static_bytes": None,
                "method": f"unavailable: {type(exc).__name__}: {exc}"}
        return memo, (box[0] if box else fn())
    return {"peak_bytes": int(base + extra), "extra_bytes": int(extra), "static_bytes": int(base),
            "method": "torch.profiler profile_memory (CPU allocator live bytes) + weights/optimizer/input bytes"}, box[0]


def selection_memory(selection: Callable[[int, int], Callable[[], None]], batch: int, device: torch.device,
                     ks: Sequence[int], chunks: Sequence[int], block: int) -> dict:
    """Peak of one selection call (made by ``selection(k, chunk)``) over ``ks`` x ``chunks``, and a verdict."""
    ks, chunks = sorted(set(ks)), sorted(set(chunks))
    out: dict = {"noise_block": block, "batch": batch, "rows": [],
                 "method": ("torch.cuda.max_memory_allocated - memory_allocated before the call"
                            if device.type == "cuda" else
                            "torch.profiler profile_memory: peak live bytes of the CPU allocator during the call, "
                            "above the level at its start"),
                 "what": "one study.objectives.cimle call under torch.no_grad on a fixed decoder prefix"}
    if not ks or not chunks:
        return out
    log(f"bench: selection memory, k {ks} x chunk {chunks}")
    grid: dict[tuple[int, int], int | None] = {}
    for k in ks:
        for c in chunks:
            memo, _ = measure_memory(selection(k, c), device)
            grid[(k, c)] = memo["extra_bytes"]
            out["rows"].append({"k": k, "chunk": c, "effective_chunk": min(c, k), "peak_bytes": memo["extra_bytes"]})
    if any(v is None for v in grid.values()):
        return out
    out["verdict"] = _selection_verdict(grid, ks, chunks)
    return out


def _selection_verdict(grid: dict[tuple[int, int], int], ks: list[int], chunks: list[int]) -> dict:
    """Does the selection's memory grow with chunk and not with k (what chunking is for)?"""
    kmin, kmax, cmin, cmax = ks[0], ks[-1], chunks[0], chunks[-1]
    # at a fixed chunk that every k can use (chunk <= min k), memory should not depend on k
    fixed = [c for c in chunks if c <= kmin] or [cmin]
    vs_k = {str(c): ratio(grid[(kmax, c)], grid[(kmin, c)]) for c in fixed}
    vs_chunk = {str(k): ratio(grid[(k, min(cmax, k))] if (k, min(cmax, k)) in grid else grid[(k, cmax)],
                              grid[(k, cmin)]) for k in ks}
    grows_k = max(v for v in vs_k.values() if v is not None)
    grows_c = min(v for v in vs_chunk.values() if v is not None)
    return {
        f"k{kmax}_over_k{kmin}_at_chunk": vs_k,
        f"chunk_max_over_chunk{cmin}_at_k": vs_chunk,
        "grows_with_chunk_not_k": bool(grows_c > 1.5 and grows_k < 1.25),
        "rule": "grows with chunk: every k's peak at its largest chunk >= 1.5x its peak at the smallest; "
                "not with k: at a fixed chunk the largest k's peak < 1.25x the smallest k's",
    }
