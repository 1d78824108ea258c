"""The report of a run over several precisions: one report per precision and the ratios across them.

Every precision's variants were timed in the same round-robin rounds
(:func:`experiments.bench.run._time_all`), so a speed-up across precisions is
paired per round like the ratios within one precision. The reference is fp32
where it was run, else the first precision.
"""

from __future__ import annotations

import time

from experiments.bench.ratios import median, ratio

__all__ = ["SCHEMA", "TARGET_BF16_SPEEDUP", "combine_precisions"]

SCHEMA = 2
TARGET_BF16_SPEEDUP = 3.5  # LS step, bf16 against fp32 (issue 13)


def _speedups(ref: dict, other: dict) -> dict:
    """Per variant: reference step / this precision's step (ratio of medians, and paired per round)."""
    ref_rows = {r["name"]: r for r in ref["rows"]}
    out = {}
    for r in other["rows"]:
        base = ref_rows.get(r["name"])
        if base is None:
            continue
        paired = [a / b for a, b in zip(base["step_s_all"], r["step_s_all"]) if b > 0]
        out[r["name"]] = {"speedup": ratio(base["step_s"], r["step_s"]),
                          "speedup_paired": median(paired) if paired else None}
    return out


def combine_precisions(reports: dict[str, dict], config_path: str | None, t_start: float) -> dict:
    """``{"schema": 2, "precisions": {precision: report}, "across_precisions": ..., "targets": ...}``."""
    reference = "fp32" if "fp32" in reports else next(iter(reports))
    across = {p: _speedups(reports[reference], rep) for p, rep in reports.items() if p != reference}
    targets = {}
    if reference == "fp32" and "bf16" in across:
        ls = across["bf16"]["ls"]
        targets[f"ls bf16 vs fp32 speedup >= {TARGET_BF16_SPEEDUP}"] = ls["speedup"] >= TARGET_BF16_SPEEDUP
        targets[f"ls bf16 vs fp32 speedup >= {TARGET_BF16_SPEEDUP} (paired)"] = (
            ls["speedup_paired"] is not None and ls["speedup_paired"] >= TARGET_BF16_SPEEDUP)
    for p, rep in reports.items():
        targets[p] = rep["targets"]
    return {
        "schema": SCHEMA,
        "config_path": config_path,
        "precisions": reports,
        "across_precisions": {"reference": reference, "speedup": across},
        "targets": targets,
        "wall_seconds": time.perf_counter() - t_start,
    }
