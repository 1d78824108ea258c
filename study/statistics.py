"""Paired comparisons of objectives over seeds, from the tidy results table.

Two runs with the same seed share their initial weights, data order and masks
up to the first step where the objectives differ, so per-seed differences
(objective - LS) cancel most of the seed-to-seed noise that separate means
carry. Each difference gets a two-sided 95% Student-t interval over seeds;
a difference "excludes 0" only when the whole interval lies on one side.
With n seeds the interval is ``mean +- t_{0.975, n-1} * sd / sqrt(n)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["paired_differences", "t_interval", "objective_variants", "PAIR_KEYS"]

# columns that, together with the seed, identify the setting two runs must share to be paired
PAIR_KEYS = ("dataset", "mask_kind", "mask_ratio", "mask_filter", "pool", "epochs", "metric")


def objective_variants(table: pd.DataFrame) -> pd.Series:
    """The objective column, with cIMLE's per-token selection told apart: ``cimle-token``."""
    objective = table["objective"].astype(str)
    if "cimle_select" not in table.columns:
        return objective
    token = (objective == "cimle") & (table["cimle_select"] == "token")
    return objective.where(~token, "cimle-token")


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a two-sided Student-t interval; NaN bounds for fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else float("nan")
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_differences(table: pd.DataFrame, baseline: str = "ls", *, level: float = 0.95,
                       metrics: tuple[str, ...] = ("knn_top1", "linear_top1")) -> pd.DataFrame:
    """Per setting and objective: the mean over seeds of (objective - ``baseline``) and its interval.

    Only pretrained-encoder rows count, and only seeds that both objectives ran.
    Columns: the setting keys present in ``table``, ``objective``, ``n`` (paired seeds),
    ``mean_diff``, ``ci_low``, ``ci_high``, ``excludes_zero``, ``objective_mean``, ``baseline_mean``.
    """
    needed = {"objective", "seed", "encoder", "metric", "value"}
    missing = needed - set(table.columns)
    if missing:
        raise ValueError(f"results table lacks columns {sorted(missing)}")
    rows = table[(table.encoder == "pretrained") & table.metric.isin(list(metrics))]
    rows = rows.assign(objective=objective_variants(rows))
    keys = [k for k in PAIR_KEYS if k in rows.columns]
    # missing keys (e.g. no filter for random masks) must still group together
    rows = rows.assign(**{k: rows[k].astype(object).fillna("-") for k in keys})
    wide = rows.pivot_table(index=keys + ["seed"], columns="objective", values="value", aggfunc="first")
    if baseline not in wide.columns:
        raise ValueError(f"no {baseline!r} rows to pair with; objectives present: {sorted(wide.columns)}")
    out = []
    for objective in sorted(c for c in wide.columns if c != baseline):
        pairs = wide[[objective, baseline]].dropna()
        for setting, group in pairs.groupby(level=keys, sort=True):
            diff = (group[objective] - group[baseline]).to_numpy()
            mean, low, high = t_interval(diff, level)
            out.append({**dict(zip(keys, setting if isinstance(setting, tuple) else (setting,))),
                        "objective": objective, "n": len(diff), "mean_diff": mean, "ci_low": low,
                        "ci_high": high, "excludes_zero": bool(low > 0 or high < 0),
                        "objective_mean": float(group[objective].mean()),
                        "baseline_mean": float(group[baseline].mean())})
    return pd.DataFrame(out)
