"""The JSON report and the printed table: arithmetic on what a run measured, nothing timed here."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from experiments.bench.settings import Plan
from experiments.bench.variants import Trainer, Variant
from study.config import config_to_dict
from study.utils.device import host_cpu
from study.utils.provenance import provenance

PAIRED_NOTE = ("paired_wall: median over rounds of the ratio within each round (variants of a round run "
               "back to back, so slow load changes cancel)")
GIB = 2**30


@dataclass
class Measured:
    """What a run measured at one precision; wall seconds per round by task (cost-model parts in brackets)."""

    plan: Plan
    variants: dict[str, Variant]
    cimle: Trainer
    tasks: dict[str, Callable[[], Any]]  # the cost-model parts
    selection: Callable[[int, int], Callable[[], None]]  # one selection call at (k, chunk)
    memos: dict[str, tuple[dict, float]]  # per variant: the memory step's peak memory and loss
    times: dict[str, list[float]] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    matmul_peak: dict = field(default_factory=dict)
    selection_rows: list[dict] = field(default_factory=list)
    load_before: list[float] | None = None


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b > 0 else float(a / b)


def _paired(num: list[float], den: list[float]) -> float | None:
    paired = [n / d for n, d in zip(num, den) if d > 0]
    return median(paired) if paired else None


def _paired_ratios(m: Measured) -> dict:
    r, ks = {name.strip("[]"): v for name, v in m.times.items()}, m.plan.args.k
    model = {k: [e + d + k * f for e, d, f in zip(r["E_fb"], r["D_fb"], r["D_f"])] for k in ks}
    return {"cimle_vs_cost_model": {str(k): _paired(r[f"cimle k={k}"], model[k]) for k in ks},
            "cimle_vs_ls": {str(k): _paired(r[f"cimle k={k}"], r["ls"]) for k in ks},
            "mvae_vs_ls": _paired(r["mvae"], r["ls"])}


def _at_batch_512(m: Measured) -> dict:
    """Whether the config's selection would fit a 40 or 80 GB card at batch 512: computed, not run."""
    c = m.plan.cfg.cimle
    # chunk None: all k samples in one call; "auto" depends on the card's free memory, which the grid does not know
    want = None if c.chunk == "auto" else (c.k, min(c.chunk or c.k, c.k))
    at = [r["peak_bytes"] for r in m.selection_rows if want and (r["k"], r["effective_chunk"]) == want]
    est = at[0] / m.plan.batch * 512 if at and at[0] is not None else None
    fits = {f"fits_{n}GB": None if est is None else est <= n * GIB for n in (40, 80)}
    return {"k": c.k, "chunk": c.chunk, "bytes": est, **fits,
            "note": "the grid's measured bytes per image at the config's k and chunk, times 512 (scaled linearly "
            "with the batch); the selection's activations alone, not the weights, optimizer state or the rest of "
            "the step; a card holds 40 or 80 GiB; null: the grid lacks the config's k and chunk"}


def _rows(m: Measured, comp: dict[str, float]) -> list[dict]:
    """One row per variant, the cIMLE rows also against their cost model."""
    peak, rows = m.matmul_peak["flop_per_s"], []
    for name, v in m.variants.items():
        (memo, loss), t, flops = m.memos[name], m.times[name], m.flops[name]
        rows.append({"name": name, **v.row, "step_s": median(t), "step_s_min": min(t), "step_s_all": t,
                     "images_per_s": m.plan.batch / median(t), "vs_ls": ratio(median(t), median(m.times["ls"])),
                     "flops": flops, "achieved_flop_per_s": flops / median(t), "peak_share": flops / median(t) / peak,
                     "peak_bytes": memo["peak_bytes"], "peak_extra_bytes": memo["extra_bytes"],
                     "static_bytes": memo["static_bytes"], "memory_method": memo["method"],
                     "loss": loss, "loss_finite": bool(math.isfinite(loss))})
        if v.row["objective"] == "cimle":
            model = comp["E_fb"] + comp["D_fb"] + v.row["k"] * comp["D_f"]
            rows[-1] |= {"cost_model_s": model, "vs_cost_model": ratio(median(t), model)}
    return rows


def _count(model: torch.nn.Module) -> dict:
    """Parameters: LS and cIMLE on the same model (cIMLE's extra at a decoder block is the bias-free noise
    projection, which adds exactly 0 at z = 0)."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def _environment(m: Measured) -> dict:
    device = m.plan.device
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(), "cpu": host_cpu(), **provenance(),
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(), "load_average_before_timing": m.load_before,
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def build_report(m: Measured, wall_seconds: float) -> dict:
    plan, block, kmax, ks = m.plan, m.plan.cfg.noise.block, m.plan.args.k[-1], m.plan.args.k
    comp = {n: median(m.times[f"[{n}]"]) for n in m.tasks}
    rows = _rows(m, comp)
    by_name = {r["name"]: r for r in rows}
    sel, sel_model = f"selection k={kmax}", (kmax + 1) * comp["D_f"]
    params = {"ours_ls": _count(m.variants["ls"].trainer.model), "ours_cimle": _count(m.cimle.model),
              "ours_mvae": _count(m.variants["mvae"].trainer.model)}
    return {
        "schema": 1, "config_path": plan.args.config, "config": config_to_dict(plan.cfg),
        "settings": {"batch": plan.batch, "steps": plan.args.steps, "warmup": plan.args.warmup, "ks": ks,
                     "precision": plan.cfg.precision, "noise_block": block,
                     "selection_ks": plan.args.selection_k, "selection_chunks": plan.args.selection_chunk,
                     "selection_timing": sel in comp, "timing": "round-robin over variants; median of warm rounds",
                     "images": "synthetic N(0, 1), fixed batch", "wall_seconds": wall_seconds},
        "environment": _environment(m), "rows": rows,
        "components": {"E_fb_s": comp["E_fb"], "D_fb_s": comp["D_fb"], "D_f_s": comp["D_f"],
                       "selection": None if sel not in comp else {
                           "k": kmax, "noise_block": block, "chunk": plan.cfg.cimle.chunk, "seconds": comp[sel],
                           "model_s": sel_model, "vs_model": ratio(comp[sel], sel_model)},
                       "all_s": {n: m.times[f"[{n}]"] for n in m.tasks}},
        "cost_model": "E_fb + D_fb + k * D_f (no optimizer step, mask or target)",
        "ls_vs_cost_model": ratio(by_name["ls"]["step_s"], comp["E_fb"] + comp["D_fb"]),
        "robust_ratios": {"paired_wall": _paired_ratios(m), "note": PAIRED_NOTE},
        "selection_memory": {"noise_block": block, "batch": plan.batch, "rows": m.selection_rows, "method": "peak "
                             "bytes during the call above the level at its start (CUDA allocator; CPU: torch.profiler)",
                             "what": "one study.losses.cimle call under torch.no_grad on a fixed decoder prefix",
                             "at_batch_512": _at_batch_512(m)},
        "parameters": params,
        "efficiency": {"matmul_peak": m.matmul_peak, "note": "FLOPs counted by torch.utils.flop_counter over one "
                       "step (forward + backward; matmuls, convolutions, attention; 2 per multiply-add); peak = best "
                       "large matmul at this precision, measured in the same run (experiments.bench.run)"},
    }


def combine_precisions(reports: dict[str, dict], config_path: str | None, wall_seconds: float) -> dict:
    """Every precision's report and its speed-ups over fp32 (else the first), paired per round too."""
    reference = "fp32" if "fp32" in reports else next(iter(reports))
    ref = {r["name"]: r for r in reports[reference]["rows"]}
    across = {p: {r["name"]: {"speedup": ratio(ref[r["name"]]["step_s"], r["step_s"]),
                              "speedup_paired": _paired(ref[r["name"]]["step_s_all"], r["step_s_all"])}
                  for r in rep["rows"] if r["name"] in ref} for p, rep in reports.items() if p != reference}
    return {"schema": 2, "config_path": config_path, "precisions": reports,
            "across_precisions": {"reference": reference, "speedup": across}, "wall_seconds": wall_seconds}


def _num(x: float | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, fmt)


def _precision_lines(p: str, rep: dict) -> list[str]:
    env, cpu, peak = rep["environment"], rep["environment"]["cpu"], rep["efficiency"]["matmul_peak"]
    where = env["device_name"] if env["device"] != "cpu" else (
        f"{cpu['model_name']}, {'+'.join(cpu['features']) or 'no AVX2'}, torch ISA {cpu['torch_cpu_capability']}")
    lines = [f"=== {p} on {env['device']} ({where}), {env['threads']} threads, batch {rep['settings']['batch']}; "
             f"matmul peak {peak['flop_per_s'] / 1e12:.3f} TFLOP/s",
             f"{'variant':<28} {'step ms':>9} {'img/s':>8} {'peak MiB':>9} {'vs LS':>6} {'vs model':>8} "
             f"{'GFLOP':>8} {'of peak':>7}"]
    lines += [f"{r['name']:<28} {1e3 * r['step_s']:9.2f} {r['images_per_s']:8.1f} "
              f"{_num(r['peak_bytes'], '.1f', 2**-20):>9} {r['vs_ls']:6.2f} {_num(r.get('vs_cost_model'), '.2f'):>8} "
              f"{r['flops'] / 1e9:8.2f} {100 * r['peak_share']:6.1f}%" for r in rep["rows"]]
    rr = rep["robust_ratios"]["paired_wall"]
    vs_ls = {**{f"cimle k={k}": v for k, v in rr["cimle_vs_ls"].items()}, "mvae": rr["mvae_vs_ls"]}
    lines.append("paired per round: / LS " + ", ".join(f"{n} {_num(v)}" for n, v in vs_ls.items()) + "; cimle / cost "
                 "model " + ", ".join(f"k={k} {_num(v)}" for k, v in rr["cimle_vs_cost_model"].items()))
    if (s := rep["components"]["selection"]) is not None:
        lines.append(f"selection k={s['k']} alone: {1e3 * s['seconds']:.2f} ms = {_num(s['vs_model'])} x (k+1) D_f")
    lines += [f"selection k={r['k']} chunk={r['chunk']}: peak {_num(r['peak_bytes'], '.1f', 2**-20)} MiB"
              for r in rep["selection_memory"]["rows"]]
    e = rep["selection_memory"]["at_batch_512"]
    return lines + [f"selection k={e['k']} chunk={e['chunk']} at batch 512 (computed): "
                    f"{_num(e['bytes'], '.3f', 1 / GIB)} GiB; fits 40 GB {e['fits_40GB']}, 80 GB {e['fits_80GB']}"]


def format_table(res: dict) -> str:
    lines = [line for p, rep in res["precisions"].items() for line in _precision_lines(p, rep)]
    for p, rows in res["across_precisions"]["speedup"].items():
        lines.append(f"{p} speed-up over {res['across_precisions']['reference']} (paired per round): " + ", ".join(
            f"{name} {_num(v['speedup'])} ({_num(v['speedup_paired'])})" for name, v in rows.items()))
    return "\n".join(lines)
