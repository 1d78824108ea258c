"""The benchmark run: check the settings, build the trainers, measure memory, time, report.

The stages run in a fixed order, which the results depend on. Per precision:
the trainers are built (each seeds the global generators), then the
cost-model components (which draw their random gradients from them), then
one memory step per variant. Then one FLOP-counting step per variant, the
matmul peak of each precision, the round-robin timing of every precision's
variants in the same rounds, and per precision the selection-memory grid.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from experiments.bench.flops import PEAK_SHAPES, matmul_peak, step_flops
from experiments.bench.memory import measure_memory, selection_memory
from experiments.bench.precisions import combine_precisions
from experiments.bench.report import Measured, StepMemo, build_report
from experiments.bench.settings import (DEFAULT_KS, DEFAULT_SELECTION_CHUNKS, DEFAULT_SELECTION_KS, Block, Plan,
                                  check_counts, check_precisions, late_noise_blocks, selection_block_of,
                                  with_changes)
from experiments.bench.timing import log, time_round_robin
from experiments.bench.transformers_side import HFTrainer, import_transformers
from experiments.bench.variants import CostParts, Trainer, Variant, cost_components, define_variants
from study.config import Config
from study.runtime import resolve_device

__all__ = ["run_bench"]


def run_bench(
    cfg: Config,
    *,
    precisions: Sequence[str] | None = None,
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
    late_blocks: Sequence[Block] | None = None,
    selection_block: Block | None = None,
    selection_timing: bool = True,
    config_path: str | None = None,
    peak_shapes: Sequence[tuple[int, int, int]] = PEAK_SHAPES,
) -> dict:
    """Run the benchmark (see :mod:`experiments.bench`) at each of ``precisions`` (default: the config's) and return
    the JSON-ready result."""
    ks = check_counts(steps, warmup, ks)
    if transformers:
        import_transformers()  # fail before any work when the bench extra is missing
    device = resolve_device(cfg.device)
    precisions = check_precisions(precisions or [cfg.precision], device)
    batch = int(batch or cfg.optim.batch_size)
    # every step is a whole optimizer step at the bench's batch, whatever accumulation the config asks for
    cfg = with_changes(cfg, compile=compile_models, optim={"batch_size": batch, "accum_steps": 1, "effective_batch": None})
    t_start = time.perf_counter()
    plans = [Plan(cfg=with_changes(cfg, precision=p), device=device, batch=batch, ks=ks, steps=steps, warmup=warmup,
                  transformers=transformers, compile_models=compile_models,
                  late=late_noise_blocks(cfg, late_noise, late_blocks), late_k=late_k, selection_ks=selection_ks,
                  selection_chunks=selection_chunks, selection_block=selection_block_of(cfg, selection_block),
                  selection_timing=selection_timing, config_path=config_path)
             for p in precisions]
    return _measure(plans, t_start, peak_shapes)


@dataclass
class _Prepared:
    """One precision's trainers, timed variants, cost-model parts, memory steps and FLOP counts."""

    plan: Plan
    compile_info: dict
    trainers: dict[str, Any]
    variants: dict[str, Variant]
    late_spec: list[tuple[Block, str]]
    parts: CostParts
    memos: dict[str, StepMemo]
    imgs: Tensor


def _prepare(plan: Plan) -> _Prepared:
    gen = torch.Generator().manual_seed(plan.cfg.seed)
    m = plan.cfg.model
    imgs = torch.randn(plan.batch, m.in_chans, m.img_size, m.img_size, generator=gen).to(plan.device)  # [B, C, H, W]
    trainers, compile_info = _build_trainers(plan, imgs)
    if plan.compile_models and not compile_info["ok"]:
        plan = dataclasses.replace(plan, cfg=with_changes(plan.cfg, compile=False))
    variants, late_spec = define_variants(trainers, plan.cfg, plan.ks, plan.late, plan.late_k)
    parts = cost_components(trainers, plan.cfg, late_spec, plan.selection_block, plan.ks[-1], plan.selection_timing)
    memos = _memory(variants, plan.device, imgs, compiled=bool(compile_info.get("ok")))
    return _Prepared(plan, compile_info, trainers, variants, late_spec, parts, memos, imgs)


def _measure(plans: list[Plan], t_start: float, peak_shapes: Sequence[tuple[int, int, int]]) -> dict:
    prepared = {plan.cfg.precision: _prepare(plan) for plan in plans}
    first = next(iter(prepared.values()))
    log("bench: FLOPs, one step per variant")  # the same ops at every precision: counted once, eager
    flops = {name: step_flops(_eager_step(v)) for name, v in first.variants.items()}
    flops |= {f"[{n}]": step_flops(fn) for n, fn in first.parts.tasks.items()}
    peaks = {}
    for precision in prepared:
        log(f"bench: matmul peak at {precision}")
        peaks[precision] = matmul_peak(precision, first.plan.device, peak_shapes)
    times, cpu_times, load_before = _time_all(prepared)
    reports = {}
    for precision, p in prepared.items():
        selection = selection_memory(p.parts.selection.selection, p.imgs.shape[0], p.plan.device,
                                     p.plan.selection_ks, p.plan.selection_chunks, p.plan.selection_block)
        block = p.plan.cfg.noise.block
        measured = Measured(
            variants=p.variants, late_spec=p.late_spec, memos=p.memos, times=times[precision],
            cpu_times=cpu_times[precision], component_blocks=p.parts.blocks, component_names=list(p.parts.tasks),
            selection_name=p.parts.selection_name, selection_memory=selection, load_before=load_before,
            models={"ours_ls": p.trainers["ls"].model, "ours_cimle": p.trainers[f"cimle@{block}"].model,
                    "ours_mvae": p.trainers["mvae"].model},
            hf_model=p.trainers["hf"].model if "hf" in p.trainers else None,
            flops=flops, matmul_peak=peaks[precision])
        reports[precision] = build_report(p.plan, p.compile_info, measured, t_start)
    return combine_precisions(reports, first.plan.config_path, t_start)


def _eager_step(v: Variant) -> Callable[[], Any]:
    """The variant's step without torch.compile (the flop counter does not see into compiled graphs)."""
    if isinstance(v.trainer, HFTrainer):
        return v.trainer.step_fn(eager=True)
    return v.trainer.step_fn(v.k, eager=True)


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


def _memory(variants: dict[str, Variant], device: torch.device, imgs: Tensor, compiled: bool) -> dict[str, StepMemo]:
    """One step per variant before the timing, measuring its peak memory.

    The optimizers are primed, so it is a steady step; on CPU the profiler
    slows it, which is why it is not timed.
    """
    if compiled:  # compile every variant (each cIMLE k is its own graph) before measuring
        log("bench: compiling every variant")
        for v in variants.values():
            v.step()
    log("bench: memory, one step per variant")
    memos: dict[str, StepMemo] = {}
    for name, v in variants.items():
        memo, loss = measure_memory(v.step, device, v.trainer.model, v.trainer.optimizer, imgs)
        memos[name] = StepMemo(memo, float(loss))
    return memos


def _time_all(prepared: dict[str, _Prepared]) -> tuple[dict, dict, list[float] | None]:
    """Round-robin timing of every variant and component of every precision in the same rounds, so that
    ratios across precisions are paired like those within one: (wall, CPU seconds per round, load average
    before), each keyed by precision, then by task name."""
    tasks: dict[str, Callable[[], Any]] = {}
    for precision, p in prepared.items():
        tasks |= {f"{precision}/{name}": v.step for name, v in p.variants.items()}
        tasks |= {f"{precision}/[{n}]": fn for n, fn in p.parts.tasks.items()}
    plan = next(iter(prepared.values())).plan
    log(f"bench: {len(tasks)} tasks ({', '.join(prepared)}), batch {plan.batch}, device {plan.device}, "
        f"{plan.steps} rounds after {plan.warmup} warm-up")
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    wall, cpu = time_round_robin(tasks, plan.steps, plan.warmup, plan.device)

    def split(src: dict[str, list[float]]) -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = {p: {} for p in prepared}
        for key, values in src.items():
            precision, name = key.split("/", 1)
            out[precision][name] = values
        return out

    return split(wall), split(cpu), load_before
