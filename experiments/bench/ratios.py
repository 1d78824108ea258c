"""Ratios of the timings: medians, the cIMLE cost model ``E_fb + D_fb + k * D_f``, and the load-robust ratios.

Timings are keyed by task name: a variant by its row name (``ls``,
``cimle k=4``), a cost-model component in brackets (``[E_fb]``,
``[D_fb@0]``, ``[D_f@0]``). The robust ratios come in two kinds:
*paired*, the median over rounds of the ratio within each round (the
variants of a round run back to back, so slow load changes cancel), and the
ratio of the medians, used on process CPU seconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["median", "ratio", "cost_model", "ratio_sets", "ROBUST_NOTE"]

ROBUST_NOTE = ("paired_wall: median over rounds of the ratio within each round (variants of a round run "
               "back to back, so slow load changes cancel); cpu_time: ratio of the median process CPU "
               "seconds (all threads, includes OpenMP spin-waiting), less sensitive to time slicing")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either is missing or ``b`` is not positive."""
    if a is None or b is None or not b > 0:
        return None
    return float(a / b)


def cost_model(comp: dict[str, float], k: int, block: int) -> float:
    """Predicted cIMLE step at ``k`` samples with the noise entering at decoder block ``block``."""
    return comp["E_fb"] + comp[f"D_fb@{block}"] + k * comp[f"D_f@{block}"]


def _rounds(src: dict[str, list[float]], name: str) -> list[float]:
    return src[name] if name in src else src[f"[{name}]"]


def _model_rounds(src: dict[str, list[float]], k: int, block: int) -> list[float]:
    """The cost model evaluated within each round, from that round's components."""
    return [e + d + k * f for e, d, f in
            zip(_rounds(src, "E_fb"), _rounds(src, f"D_fb@{block}"), _rounds(src, f"D_f@{block}"))]


def _both(num: list[float], den: list[float]) -> tuple[float | None, float | None]:
    """(median of the per-round ratios, ratio of the medians)."""
    paired = [n / d for n, d in zip(num, den) if d > 0]
    return (median(paired) if paired else None), ratio(median(num), median(den))


def ratio_sets(src: dict[str, list[float]], ks: Sequence[int], block: int, late_spec: Sequence[tuple[int, str]],
               hf_name: str | None) -> tuple[dict, dict]:
    """(paired, ratio of medians) of the report's ratios, from the per-round timings ``src``.

    ``late_spec``: (noise block, row name) of the late-noise rows; ``hf_name``:
    the row of transformers' model, None where it was not run.
    """
    pairs: dict = {"cimle_vs_cost_model": {}, "cimle_vs_ls": {}, "late_noise_vs_ls": {}}
    for k in ks:
        pairs["cimle_vs_cost_model"][str(k)] = _both(_rounds(src, f"cimle k={k}"), _model_rounds(src, k, block))
        pairs["cimle_vs_ls"][str(k)] = _both(_rounds(src, f"cimle k={k}"), _rounds(src, "ls"))
    for b, name in late_spec:
        pairs["late_noise_vs_ls"][str(b)] = _both(_rounds(src, name), _rounds(src, "ls"))
    pairs["mvae_vs_ls"] = _both(_rounds(src, "mvae"), _rounds(src, "ls"))
    if hf_name is not None:
        pairs["ours_vs_transformers"] = _both(_rounds(src, "ls"), _rounds(src, hf_name))
    out: tuple[dict, dict] = ({}, {})
    for key, val in pairs.items():
        if isinstance(val, dict):
            out[0][key] = {kk: v[0] for kk, v in val.items()}
            out[1][key] = {kk: v[1] for kk, v in val.items()}
        else:
            out[0][key], out[1][key] = val
    return out
