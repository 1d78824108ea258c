"""The benchmark run: check the settings, build the trainers, measure memory and host syncs, time, report.

The stages run in a fixed order, which the results depend on: the trainers
are built (each seeds the global generators), then the cost-model components
(which draw their random gradients from them), then one memory step per
variant, then the round-robin timing, then the selection-memory grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from study.bench.host_sync import SyncCounter
from study.bench.memory import measure_memory, selection_memory
from study.bench.report import Measured, StepMemo, build_report
from study.bench.settings import (DEFAULT_KS, DEFAULT_SELECTION_CHUNKS, DEFAULT_SELECTION_KS, Plan, check_counts,
                                  late_noise_blocks, selection_block_of, with_changes)
from study.bench.timing import log, time_round_robin
from study.bench.transformers_side import HFTrainer, import_transformers
from study.bench.variants import CostParts, Trainer, Variant, cost_components, define_variants
from study.config import Config
from study.runtime import resolve_device

__all__ = ["run_bench"]


def run_bench(
    cfg: Config,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch: int | None = None,
    steps: int = 20,
    warmup: int = 3,
    transformers: bool = True,
    compile_models: bool = False,
    selection_ks: Sequence[int] = DEFAULT_SELECTION_KS,
    selection_chunks: Sequence[int] = DEFAULT_SELECTION_CHUNKS,
    late_noise: bool = True,
    late_k: int = 8,
    late_blocks: Sequence[int] | None = None,
    selection_block: int | None = None,
    selection_timing: bool = True,
    config_path: str | None = None,
) -> dict:
    """Run the benchmark (see :mod:`study.bench`) and return the JSON-ready result."""
    ks = check_counts(steps, warmup, ks)
    if transformers:
        import_transformers()  # fail before any work when the bench extra is missing
    device = resolve_device(cfg.device)
    batch = int(batch or cfg.optim.batch_size)
    cfg = with_changes(cfg, compile=compile_models, optim={"batch_size": batch})
    t_start = time.perf_counter()
    plan = Plan(cfg=cfg, device=device, batch=batch, ks=ks, steps=steps, warmup=warmup, transformers=transformers,
                compile_models=compile_models, late=late_noise_blocks(cfg, late_noise, late_blocks), late_k=late_k,
                selection_ks=selection_ks, selection_chunks=selection_chunks,
                selection_block=selection_block_of(cfg, selection_block), selection_timing=selection_timing,
                config_path=config_path)
    return _measure(plan, t_start)


def _measure(plan: Plan, t_start: float) -> dict:
    gen = torch.Generator().manual_seed(plan.cfg.seed)
    m = plan.cfg.model
    imgs = torch.randn(plan.batch, m.in_chans, m.img_size, m.img_size, generator=gen).to(plan.device)  # [B, C, H, W]
    trainers, compile_info = _build_trainers(plan, imgs)
    if plan.compile_models and not compile_info["ok"]:
        plan = dataclasses.replace(plan, cfg=with_changes(plan.cfg, compile=False))
    variants, late_spec = define_variants(trainers, plan.cfg, plan.ks, plan.late, plan.late_k)
    parts = cost_components(trainers, plan.cfg, late_spec, plan.selection_block, plan.ks[-1], plan.selection_timing)
    memos = _memory_and_syncs(variants, plan.device, imgs, compiled=bool(compile_info.get("ok")))
    times, cpu_times, load_before = _time_all(plan, variants, parts)
    selection = selection_memory(parts.selection.selection, imgs.shape[0], plan.device, plan.selection_ks,
                                 plan.selection_chunks, plan.selection_block)
    block = plan.cfg.noise.block
    measured = Measured(
        variants=variants, late_spec=late_spec, memos=memos, times=times, cpu_times=cpu_times,
        component_blocks=parts.blocks, component_names=list(parts.tasks), selection_name=parts.selection_name,
        selection_memory=selection, load_before=load_before,
        models={"ours_ls": trainers["ls"].model, "ours_cimle": trainers[f"cimle@{block}"].model,
                "ours_mvae": trainers["mvae"].model},
        hf_model=trainers["hf"].model if "hf" in trainers else None)
    return build_report(plan, compile_info, measured, t_start)


def _make_trainers(plan: Plan, cfg: Config, imgs: Tensor, compile_now: bool) -> dict[str, Any]:
    """LS, cIMLE and the Masked VAE, a cIMLE model per further noise block used, and transformers' model."""
    def ours(**changes) -> Trainer:
        return Trainer(with_changes(cfg, **changes), plan.device, imgs, compile_now)

    trainers: dict[str, Any] = {"ls": ours(objective="ls"), f"cimle@{cfg.noise.block}": ours(objective="cimle"),
                                "mvae": ours(objective="mvae")}
    for b in plan.late + [plan.selection_block]:
        if f"cimle@{b}" not in trainers:
            trainers[f"cimle@{b}"] = ours(objective="cimle", noise={"block": b})
    if plan.transformers:
        trainers["hf"] = HFTrainer(cfg, plan.device, imgs, compile_now)
    return trainers


def _build_trainers(plan: Plan, imgs: Tensor) -> tuple[dict[str, Any], dict]:
    """The trainers, compiled where asked; a failed compile is reported and the run goes on eager."""
    compile_info: dict = {"requested": plan.compile_models}
    trainers = _make_trainers(plan, plan.cfg, imgs, plan.compile_models)
    if not plan.compile_models:
        return trainers, compile_info
    t0 = time.perf_counter()
    try:
        trainers["ls"].step_fn()()
        if "hf" in trainers:
            trainers["hf"].step_fn()()
        compile_info.update(ok=True, first_step_seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - reported, then the run goes on in eager mode
        compile_info.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        log(f"torch.compile failed, running eager: {compile_info['error'][:300]}")
        trainers = _make_trainers(plan, with_changes(plan.cfg, compile=False), imgs, False)
    return trainers, compile_info


def _memory_and_syncs(variants: dict[str, Variant], device: torch.device, imgs: Tensor,
                      compiled: bool) -> dict[str, StepMemo]:
    """One step per variant before the timing, measuring its peak memory and counting its host syncs.

    The optimizers are primed, so it is a steady step; on CPU the profiler
    slows it, which is why it is not timed. Compiled code hides its calls from
    the sync counter, so with compile the syncs are counted on an extra eager step.
    """
    if compiled:  # compile every variant (each cIMLE k is its own graph) before measuring
        log("bench: compiling every variant")
        for v in variants.values():
            v.step()
    log("bench: memory and host syncs, one step per variant")
    memos: dict[str, StepMemo] = {}
    for name, v in variants.items():
        counter = SyncCounter()
        with (counter if not compiled else contextlib.nullcontext()):
            memo, loss = measure_memory(v.step, device, v.trainer.model, v.trainer.optimizer, imgs)
        if compiled and isinstance(v.trainer, Trainer):
            step = v.trainer.step_fn(v.k, eager=True)
            with counter:
                step()
        memos[name] = StepMemo(memo, float(loss), dict(sorted(counter.hits.items())))
    return memos


def _time_all(plan: Plan, variants: dict[str, Variant],
              parts: CostParts) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float] | None]:
    """Round-robin timing of every variant and component: (wall, CPU seconds per round, load average before)."""
    log(f"bench: {len(variants)} variants + {len(parts.tasks)} components, batch {plan.batch}, "
        f"device {plan.device}, {plan.steps} rounds after {plan.warmup} warm-up")
    tasks: dict[str, Callable[[], Any]] = {name: v.step for name, v in variants.items()}
    tasks |= {f"[{n}]": fn for n, fn in parts.tasks.items()}
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    times, cpu_times = time_round_robin(tasks, plan.steps, plan.warmup, plan.device)
    return times, cpu_times, load_before
