"""Round-robin timing of step closures, the device sync that ends a measurement, and the progress log.

Every task is warmed up first; then each round runs one call of every task in
turn, so that load from other processes hits all of them alike. A call is
measured in wall-clock seconds and in process CPU seconds (all threads).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout carries only the table."""
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer or a memory reading sees it done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(tasks: dict[str, Callable[[], Any]], steps: int, warmup: int,
                     device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every task up, then ``steps`` rounds of one call of each.

    Returns wall-clock seconds and process CPU seconds (all threads) per call.
    """
    for name, fn in tasks.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync(device)
        log(f"  warmed {name} ({time.perf_counter() - t0:.2f} s)")
    wall: dict[str, list[float]] = {name: [] for name in tasks}
    cpu: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(steps):
        t_round = time.perf_counter()
        for name, fn in tasks.items():
            sync(device)
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        log(f"  round {r + 1}/{steps} ({time.perf_counter() - t_round:.2f} s)")
    return wall, cpu
