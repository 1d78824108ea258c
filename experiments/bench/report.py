"""The JSON report: rows per variant, the cost model, late noise, the robust ratios, parameters and targets.

Everything here is arithmetic on what the run measured (:class:`Measured`);
nothing is timed. The targets named by the issue are reported, never asserted.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from experiments.bench.ratios import ROBUST_NOTE, cost_model, median, ratio, ratio_sets
from experiments.bench.settings import Plan
from experiments.bench.transformers_side import parameter_counts, transformers_info
from experiments.bench.variants import HF_VARIANT, Variant
from study.config import config_to_dict
from study.runtime import host_cpu

__all__ = ["StepMemo", "Measured", "build_report"]

TARGET_OURS_VS_TRANSFORMERS = 0.9
TARGET_CIMLE_VS_COST_MODEL = 1.1
TARGET_LATE_NOISE_K8_VS_LS = {"last": 1.3, "head": 1.15}  # noise at the last decoder block; in the token-wise head
TARGET_PEAK_SHARE = {"bf16": 0.4}  # LS step FLOP/s over the measured matmul peak

_DEFINITIONS = {
    "E_fb": "encoder forward on the visible patches + backward of a fixed output gradient",
    "D_fb": "decoder prefix + masked_sampler (its shared part and one decode) at the chosen noise, "
            "least_squares, backward (gradient also to the encoder output); keyed by noise block",
    "D_f": "one no-grad pass of the per-sample decode of decoder.masked_sampler (blocks noise.block .. "
           "depth-1, norm, pred at the masked patches; noise in the head: the head after its shared "
           "first-layer part) at batch B + its per-example distance; keyed by noise block",
    "optimizer": "one AdamW step of the cIMLE model (all gradients present) + zero_grad",
}


@dataclass
class StepMemo:
    """The memory step of one variant: its peak memory and its loss."""

    memory: dict
    loss: float


@dataclass
class Measured:
    """What one run measured, by variant and component."""

    variants: dict[str, Variant]
    late_spec: list[tuple[int, str]]  # (noise block, row name) of the late-noise rows
    memos: dict[str, StepMemo]
    times: dict[str, list[float]]  # wall seconds per round, by task name (components in brackets)
    cpu_times: dict[str, list[float]]
    component_blocks: list[int]
    component_names: list[str]
    selection_name: str
    selection_memory: dict
    load_before: list[float] | None
    models: dict[str, torch.nn.Module]  # parameter-count key (ours_ls, ...) -> model
    hf_model: torch.nn.Module | None
    flops: dict[str, int]  # FLOPs of one step by task name (experiments.bench.flops)
    matmul_peak: dict  # experiments.bench.flops.matmul_peak at this precision


def _variant_rows(m: Measured, batch: int) -> list[dict]:
    med = {name: median(m.times[name]) for name in m.variants}
    peak = m.matmul_peak["flop_per_s"]
    rows = []
    for name, v in m.variants.items():
        memo, loss = m.memos[name].memory, m.memos[name].loss
        flops = m.flops[name]
        rows.append({
            "name": name, **v.row,
            "step_s": med[name], "step_s_min": min(m.times[name]), "step_cpu_s": median(m.cpu_times[name]),
            "step_s_all": m.times[name],
            "images_per_s": batch / med[name],
            "flops": flops, "achieved_flop_per_s": flops / med[name], "peak_share": flops / med[name] / peak,
            "peak_bytes": memo["peak_bytes"], "peak_extra_bytes": memo["extra_bytes"],
            "static_bytes": memo["static_bytes"], "memory_method": memo["method"],
            "loss": loss, "loss_finite": bool(math.isfinite(loss)),
        })
    return rows


def _cimle_ratios(by_name: dict[str, dict], comp: dict[str, float], ks: Sequence[int], block: int,
                  ls_s: float) -> tuple[dict, dict, dict]:
    """Fill the cIMLE rows' cost model; returns (vs cost model, vs cost model + optimizer, vs LS) by k."""
    vs_cost, vs_cost_opt, vs_ls = {}, {}, {}
    for k in ks:
        r = by_name[f"cimle k={k}"]
        r["cost_model_s"] = cost_model(comp, k, block)
        r["cost_model_with_optimizer_s"] = r["cost_model_s"] + comp["optimizer"]
        vs_cost[str(k)] = ratio(r["step_s"], r["cost_model_s"])
        vs_cost_opt[str(k)] = ratio(r["step_s"], r["cost_model_with_optimizer_s"])
        vs_ls[str(k)] = ratio(r["step_s"], ls_s)
        r["vs_ls"] = vs_ls[str(k)]
        r["vs_cost_model"] = vs_cost[str(k)]
    return vs_cost, vs_cost_opt, vs_ls


def _where(block, depth: int) -> str:
    if block == "head":
        return "token-wise head (after the last attention)"
    if block == 0:
        return "input (block 0)"
    if block == depth - 1:
        return "last decoder block"
    return "after the last block" if block == depth else f"block {block}"


def _late_noise_rows(by_name: dict[str, dict], comp: dict[str, float], plan: Plan,
                     late_spec: Sequence[tuple[int, str]], ls_s: float) -> list[dict]:
    depth, late_rows = plan.cfg.model.decoder_depth, []
    for b, name in late_spec:
        r = by_name[name]
        c = cost_model(comp, plan.late_k, b)
        late_rows.append({
            "noise_block": b, "k": plan.late_k, "decoder_depth": depth, "where": _where(b, depth),
            "step_s": r["step_s"], "ls_step_s": ls_s, "vs_ls": ratio(r["step_s"], ls_s),
            "D_f_s": comp[f"D_f@{b}"], "D_fb_s": comp[f"D_fb@{b}"],
            "cost_model_s": c, "vs_cost_model": ratio(r["step_s"], c),
            "suffix_blocks": 0 if b == "head" else depth - b,
        })
        r.setdefault("cost_model_s", c)
        r.setdefault("vs_cost_model", ratio(r["step_s"], c))
    return late_rows


def _judge(ratios: dict, late: dict[str, dict | None], late_key: str, late_k: int) -> dict:
    ovt = ratios.get("ours_vs_transformers")
    cvc = [v for v in ratios["cimle_vs_cost_model"].values() if v is not None]
    out = {
        f"ours_ls_vs_transformers <= {TARGET_OURS_VS_TRANSFORMERS}": (
            None if ovt is None else ovt <= TARGET_OURS_VS_TRANSFORMERS),
        f"cimle_vs_cost_model <= {TARGET_CIMLE_VS_COST_MODEL} (every k)": all(
            v <= TARGET_CIMLE_VS_COST_MODEL for v in cvc),
    }
    for where, row in late.items():
        target = TARGET_LATE_NOISE_K8_VS_LS[where]
        label = "last decoder block" if where == "last" else "token-wise head"
        out[f"late noise ({label}) k={late_k} vs ls <= {target}"] = (
            None if row is None or row[late_key] is None else row[late_key] <= target)
    return out


def _targets(primary: dict, paired_wall: dict, cpu_ratios: dict, late_rows: list[dict], plan: Plan,
             selection: dict, ls_row: dict) -> dict:
    """The issue's targets on the primary ratios and on the robust ones (reported, not asserted)."""
    depth = plan.cfg.model.decoder_depth
    late = {"last": next((r for r in late_rows if r["noise_block"] == depth - 1), None),
            "head": next((r for r in late_rows if r["noise_block"] == "head"), None)}
    out = {
        "median_wall (primary)": _judge(primary, late, "vs_ls", plan.late_k),
        "paired_wall": _judge(paired_wall, late, "vs_ls_paired", plan.late_k),
        "cpu_time": _judge(cpu_ratios, late, "vs_ls_cpu_time", plan.late_k),
        "selection memory grows with chunk, not k": selection.get("verdict", {}).get("grows_with_chunk_not_k"),
    }
    share = TARGET_PEAK_SHARE.get(plan.cfg.precision)
    if share is not None:
        out[f"ls share of the {plan.cfg.precision} matmul peak >= {share}"] = ls_row["peak_share"] >= share
    return out


def _environment(device: torch.device, load_before: list[float] | None) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu": host_cpu(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_before_timing": load_before,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _settings(plan: Plan, compile_info: dict, late_spec: Sequence[tuple[int, str]]) -> dict:
    return {
        "batch": plan.batch, "steps": plan.steps, "warmup": plan.warmup, "ks": plan.ks,
        "precision": plan.cfg.precision, "compile": compile_info, "transformers": plan.transformers,
        "late_k": plan.late_k, "late_blocks": [b for b, _ in late_spec], "selection_ks": list(plan.selection_ks),
        "selection_chunks": list(plan.selection_chunks), "selection_block": plan.selection_block,
        "selection_timing": plan.selection_timing, "timing": "round-robin over variants; median of warm rounds",
        "images": "synthetic N(0, 1), fixed batch", "wall_seconds": None,
    }


def _components(plan: Plan, comp: dict[str, float], m: Measured) -> dict:
    block, kmax = plan.cfg.noise.block, plan.ks[-1]
    sel_model = (kmax + 1) * comp[f"D_f@{block}"]
    return {
        "E_fb_s": comp["E_fb"],
        "D_fb_s": {str(b): comp[f"D_fb@{b}"] for b in m.component_blocks},
        "D_f_s": {str(b): comp[f"D_f@{b}"] for b in m.component_blocks},
        "optimizer_s": comp["optimizer"],
        "selection": None if not plan.selection_timing else {
            "k": kmax, "noise_block": block, "chunk": plan.cfg.cimle.chunk,
            "seconds": comp[m.selection_name], "model_s": sel_model,
            "vs_model": ratio(comp[m.selection_name], sel_model),
            "definition": "one study.objectives.cimle call under no_grad: k per-sample decodes "
                          "+ distances + one no-grad pass at the chosen noise; model (k+1) * D_f"},
        "definitions": dict(_DEFINITIONS),
        "all_s": {n: m.times[f"[{n}]"] for n in m.component_names},
    }


def _efficiency(m: Measured, by_name: dict[str, dict]) -> dict:
    """FLOPs, achieved FLOP/s and the share of the measured matmul peak, per variant and component."""
    peak = m.matmul_peak["flop_per_s"]
    components = {}
    for n in m.component_names:
        seconds = median(m.times[f"[{n}]"])
        flops = m.flops.get(f"[{n}]")
        components[n] = None if flops is None else {
            "flops": flops, "achieved_flop_per_s": flops / seconds, "peak_share": flops / seconds / peak}
    return {
        "matmul_peak": m.matmul_peak,
        "rows": {name: {k: r[k] for k in ("flops", "achieved_flop_per_s", "peak_share")}
                 for name, r in by_name.items()},
        "components": components,
        "note": "FLOPs counted by torch.utils.flop_counter over one step (forward + backward; matmuls, "
                "convolutions, attention; 2 per multiply-add); peak = best large matmul at this precision, "
                "measured in the same run (experiments.bench.flops)",
    }


def build_report(plan: Plan, compile_info: dict, m: Measured, t_start: float) -> dict:
    """The JSON-ready result of a run that started at ``t_start`` (``time.perf_counter``)."""
    comp = {n: median(m.times[f"[{n}]"]) for n in m.component_names}
    block = plan.cfg.noise.block
    rows = _variant_rows(m, plan.batch)
    by_name = {r["name"]: r for r in rows}
    ls_s = by_name["ls"]["step_s"]
    cimle_vs_cost, cimle_vs_cost_opt, cimle_vs_ls = _cimle_ratios(by_name, comp, plan.ks, block, ls_s)
    for r in rows:
        r.setdefault("vs_ls", ratio(r["step_s"], ls_s))
    late_rows = _late_noise_rows(by_name, comp, plan, m.late_spec, ls_s)
    hf_name = HF_VARIANT if HF_VARIANT in m.variants else None
    paired_wall, _ = ratio_sets(m.times, plan.ks, block, m.late_spec, hf_name)
    _, cpu_ratios = ratio_sets(m.cpu_times, plan.ks, block, m.late_spec, hf_name)
    for r in late_rows:
        r["vs_ls_paired"] = paired_wall["late_noise_vs_ls"][str(r["noise_block"])]
        r["vs_ls_cpu_time"] = cpu_ratios["late_noise_vs_ls"][str(r["noise_block"])]
    hf_s = by_name[hf_name]["step_s"] if hf_name else None
    ours_vs_hf = ratio(ls_s, hf_s)
    result = {
        "schema": 1,
        "config_path": plan.config_path,
        "config": config_to_dict(plan.cfg),
        "settings": _settings(plan, compile_info, m.late_spec),
        "environment": _environment(plan.device, m.load_before),
        "rows": rows,
        "components": _components(plan, comp, m),
        "cost_model": "E_fb + D_fb + k * D_f (no optimizer step, mask or target)",
        "ls_vs_cost_model": ratio(ls_s, comp["E_fb"] + comp[f"D_fb@{block}"]),
        "ours_vs_transformers": ours_vs_hf,
        "cimle_vs_cost_model": cimle_vs_cost,
        "cimle_vs_cost_model_with_optimizer": cimle_vs_cost_opt,
        "cimle_vs_ls": cimle_vs_ls,
        "mvae_vs_ls": ratio(by_name["mvae"]["step_s"], ls_s),
        "robust_ratios": {"paired_wall": paired_wall, "cpu_time": cpu_ratios, "note": ROBUST_NOTE},
        "late_noise": late_rows,
        "selection_memory": m.selection_memory,
        "parameters": parameter_counts(m.models, m.hf_model),
        "transformers": transformers_info(m.hf_model, hf_s),
        "efficiency": _efficiency(m, by_name),
        "targets": _targets({"ours_vs_transformers": ours_vs_hf, "cimle_vs_cost_model": cimle_vs_cost},
                            paired_wall, cpu_ratios, late_rows, plan, m.selection_memory, by_name["ls"]),
    }
    result["settings"]["wall_seconds"] = time.perf_counter() - t_start
    return result
