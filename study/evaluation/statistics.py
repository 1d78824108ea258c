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

__all__ = ["paired_differences", "t_interval", "objective_variants", "decoders", "PAIR_KEYS", "holm", "paired_p_value", "equivalence",
           "trend_per_doubling"]

# columns that, together with the seed, identify the setting two runs must share to be paired
PAIR_KEYS = ("dataset", "mask_kind", "mask_ratio", "mask_filter", "pool", "epochs", "metric")


def decoders(table: pd.DataFrame) -> pd.Series:
    """Which network each row's decoder is: ``head`` (the token-wise noise head replaces MAE's linear
    prediction layer) or ``plain`` (MAE's decoder; noise added at a block is exactly 0 at z = 0)."""
    if "noise_block" not in table.columns:
        return pd.Series("plain", index=table.index)
    return (table["noise_block"].astype(str) == "head").map({True: "head", False: "plain"})


def objective_variants(table: pd.DataFrame) -> pd.Series:
    """The objective column, with cIMLE's per-token selection told apart (``cimle-token``) and, where the
    table holds an objective on both decoders, its head variant named ``<objective>-head``."""
    objective = table["objective"].astype(str)
    if "cimle_select" in table.columns:
        token = (objective == "cimle") & (table["cimle_select"] == "token")
        objective = objective.where(~token, "cimle-token")
    decoder = decoders(table)
    both = {name for name, kinds in decoder.groupby(objective) if kinds.nunique() > 1}
    on_head = (decoder == "head") & objective.isin(both)
    return objective.where(~on_head, objective + "-head")


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

    Each objective is paired with the baseline on the same decoder (:func:`decoders`): an arm with the
    noise head against LS with the head at z = 0, the others against LS on MAE's decoder. Only
    pretrained-encoder rows count, and only seeds that both ran. Columns: the setting keys present in
    ``table``, ``decoder``, ``objective``, ``n`` (paired seeds), ``mean_diff``, ``ci_low``, ``ci_high``,
    ``excludes_zero``, ``p``, ``objective_mean``, ``baseline_mean``.
    """
    needed = {"objective", "seed", "encoder", "metric", "value"}
    missing = needed - set(table.columns)
    if missing:
        raise ValueError(f"results table lacks columns {sorted(missing)}")
    rows = table[(table.encoder == "pretrained") & table.metric.isin(list(metrics))]
    rows = rows.assign(objective=objective_variants(rows), decoder=decoders(rows))
    keys = [k for k in PAIR_KEYS if k in rows.columns] + ["decoder"]
    # missing keys (e.g. no filter for random masks) must still group together
    rows = rows.assign(**{k: rows[k].astype(object).fillna("-") for k in keys})
    wide = rows.pivot_table(index=keys + ["seed"], columns="objective", values="value", aggfunc="first")
    twins = [c for c in (baseline, f"{baseline}-head") if c in wide.columns]
    if not twins:
        raise ValueError(f"no {baseline!r} rows to pair with; objectives present: {sorted(wide.columns)}")
    # the decoder is part of the index, so a row holds at most one of the baseline's two variants
    base = wide[twins].bfill(axis=1).iloc[:, 0]
    out = []
    for objective in sorted(c for c in wide.columns if c not in twins):
        pairs = pd.DataFrame({"objective": wide[objective], "baseline": base}).dropna()
        for setting, group in pairs.groupby(level=keys, sort=True):
            diff = (group["objective"] - group["baseline"]).to_numpy()
            mean, low, high = t_interval(diff, level)
            out.append({**dict(zip(keys, setting if isinstance(setting, tuple) else (setting,))),
                        "objective": objective, "n": len(diff), "mean_diff": mean, "ci_low": low,
                        "ci_high": high, "excludes_zero": bool(low > 0 or high < 0), "p": paired_p_value(diff),
                        "objective_mean": float(group["objective"].mean()),
                        "baseline_mean": float(group["baseline"].mean())})
    return pd.DataFrame(out)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control for the whole family); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_p_value(diff) -> float:
    """Two-sided p-value of the one-sample t test of ``diff`` against 0 (NaN for fewer than 2 values)."""
    diff = np.asarray(diff, dtype=float)
    if len(diff) < 2:
        return float("nan")
    if np.all(diff == diff[0]):
        return 0.0 if diff[0] != 0 else 1.0
    return float(stats.ttest_1samp(diff, 0.0).pvalue)


def equivalence(diff, bound: float, level: float = 0.90) -> dict:
    """Two one-sided t tests (TOST) of ``|mean diff| < bound``: equivalent when the ``level`` (90%: each
    one-sided test at 5%) t-interval lies inside ``(-bound, bound)``. Returns the interval, the TOST
    p-value (the larger of the two one-sided p-values), ``equivalent`` and the ``verdict``: level, not
    level (the whole interval outside the bound) or not resolved."""
    diff = np.asarray(diff, dtype=float)
    mean, low, high = t_interval(diff, level)
    if len(diff) < 2:
        p = float("nan")
    else:
        lower = stats.ttest_1samp(diff, -bound, alternative="greater").pvalue
        upper = stats.ttest_1samp(diff, bound, alternative="less").pvalue
        p = float(max(lower, upper))
    equivalent = bool(low > -bound and high < bound)
    outside = bool(low > bound or high < -bound)
    return {"mean": mean, "low": low, "high": high, "bound": bound, "p_tost": p, "equivalent": equivalent,
            "verdict": "level" if equivalent else "not level" if outside else "not resolved"}


def trend_per_doubling(k, diff_by_seed: pd.DataFrame, level: float = 0.95) -> dict:
    """The slope of a paired difference over log2(k), one least-squares slope per seed (rows: seeds,
    columns: the k values), and the Student-t interval of the seeds' slopes: one test for a family of k."""
    x = np.log2(np.asarray(k, dtype=float))
    slopes = np.array([stats.linregress(x, row).slope for row in np.asarray(diff_by_seed, dtype=float)])
    mean, low, high = t_interval(slopes, level)
    return {"slope": mean, "low": low, "high": high, "n": len(slopes), "p": paired_p_value(slopes),
            "excludes_zero": bool(low > 0 or high < 0)}
