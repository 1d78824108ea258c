"""The run. Its order is fixed because the results depend on it: the models seed the global generators and the
cost-model parts draw from them; then FLOPs, the matmul peak, one round-robin over every precision's steps (so
that speed-ups across precisions are paired per round) and the selection memory."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from experiments.bench.memory import log, measure_memory, sync
from experiments.bench.report import Measured, build_report, combine_precisions, format_table
from experiments.bench.settings import Plan, build_parser, make_plans
from experiments.bench.variants import cost_components, define_variants
from study.config import load_config
from study.utils.errors import run_parsed
from study.utils.io import atomic_write_text

# (M, K, N) of the matmul peak: two squares and the in100 decoder's MLP at batch 32 (32 x 197 tokens, 512 -> 2048)
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (6304, 512, 2048))
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call, forward and backward, 2 per multiply-add, elementwise work 0 (as in MFU). The counter's
    table lacks PyTorch's CPU attention kernel; it gets the formula of the other attention kernels."""
    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v)}
    counter = FlopCounterMode(display=False, custom_mapping=formulas)
    with counter:
        step()
    return int(counter.get_total_flops())


def matmul_peak(precision: str, device: torch.device, shapes=PEAK_SHAPES, min_seconds: float = 0.5) -> dict:
    """The best matmul FLOP/s over ``shapes`` (M, K, N): what this machine's matrix units reach, the MFU base."""
    dtype, gen, per_shape = _DTYPES[precision], torch.Generator().manual_seed(0), []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        calls, t0, elapsed = 0, time.perf_counter(), 0.0
        while elapsed < min_seconds:
            torch.mm(a, b)
            calls += 1
            sync(device)
            elapsed = time.perf_counter() - t0
        per_shape.append({"m": m, "k": k, "n": n, "flop_per_s": 2 * m * k * n * calls / elapsed, "calls": calls})
    best = max(per_shape, key=lambda r: r["flop_per_s"])
    return {"precision": precision, "dtype": str(dtype), "flop_per_s": best["flop_per_s"],
            "best_shape": [best["m"], best["k"], best["n"]], "shapes": per_shape, "threads": torch.get_num_threads()}


def time_round_robin(tasks: dict[str, Callable[[], Any]], steps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Wall seconds per call in rounds of one call of each task, so that load from other processes hits all tasks
    alike; the first ``warmup`` rounds are not kept."""
    wall: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(warmup + steps):
        t_round = time.perf_counter()
        for name, fn in tasks.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                wall[name].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{warmup + steps}{' (warm-up)' * (r < warmup)} ({time.perf_counter() - t_round:.2f} s)")
    return wall


def _prepare(plan: Plan) -> Measured:
    """One precision's variants, cost-model parts and a memory step per variant (untimed: the profiler slows it)."""
    m = plan.cfg.model
    imgs = torch.randn(plan.batch, m.in_chans, m.img_size, m.img_size,  # [B, C, H, W]
                       generator=torch.Generator().manual_seed(plan.cfg.seed)).to(plan.device)
    variants, cimle_trainer = define_variants(plan, imgs)
    tasks, comps = cost_components(plan, cimle_trainer)
    log("bench: memory, one step per variant")
    memos = {}
    for name, v in variants.items():
        memo, loss = measure_memory(v.step, plan.device, v.trainer.model, v.trainer.optimizer, imgs)
        memos[name] = (memo, float(loss))
    return Measured(plan, variants, cimle_trainer, tasks, comps.selection, memos)


def run_bench(plans: list[Plan]) -> dict:
    """The JSON-ready result of every plan's precision."""
    t_start, args, device = time.perf_counter(), plans[0].args, plans[0].device
    runs = [_prepare(plan) for plan in plans]
    log("bench: FLOPs, one step per variant")  # the same operations at every precision: counted once
    flops = {name: step_flops(v.step) for name, v in runs[0].variants.items()}
    for m in runs:
        log(f"bench: matmul peak at {m.plan.cfg.precision}")
        m.flops, m.matmul_peak = flops, matmul_peak(m.plan.cfg.precision, device, PEAK_SHAPES)
    tasks = {f"{m.plan.cfg.precision}/{name}": v.step for m in runs for name, v in m.variants.items()}
    tasks |= {f"{m.plan.cfg.precision}/[{n}]": fn for m in runs for n, fn in m.tasks.items()}
    log(f"bench: {len(tasks)} tasks, batch {plans[0].batch}, {args.steps} rounds after {args.warmup} warm-up")
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    wall = time_round_robin(tasks, args.steps, args.warmup, device)
    reports = {}
    for m in runs:
        prefix = f"{m.plan.cfg.precision}/"
        m.times = {key.removeprefix(prefix): v for key, v in wall.items() if key.startswith(prefix)}
        m.load_before = load_before
        log(f"bench: selection memory, k {args.selection_k} x chunk {args.selection_chunk}")
        m.selection_rows = [{"k": k, "chunk": c, "effective_chunk": min(c, k), "peak_bytes": measure_memory(
            m.selection(k, c), device)[0]["extra_bytes"]} for k in args.selection_k for c in args.selection_chunk]
        reports[m.plan.cfg.precision] = build_report(m, time.perf_counter() - t_start)
    return combine_precisions(reports, args.config, time.perf_counter() - t_start)


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser(), argv, _run)


def _run(args) -> int:
    res = run_bench(make_plans(load_config(args.config, args.overrides), args))
    print(format_table(res))
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
