"""Real digits with the conditional mean of the masked content erased: each arm against least squares.

From ``results/mean_erased_cpu.csv`` (``make mean-erased``): MNIST-5k at ratio 0.75, 30 epochs, every arm
on the decoder with the token-wise head (LS fed z = 0), the masked target patches' signs flipped with
probability p (per patch or one sign per image). Per setting and arm: k-NN and linear probe on clean
digits (mean pooling), and the paired difference to LS of the same seed and setting with its 95%
t-interval and Holm-adjusted p-value (the family: every cell of the table; the primary comparison,
per-token cIMLE - LS at p = 0.5 with per-patch signs, is named in docs/expectations.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from study.evaluation.results import read_results
from study.evaluation.statistics import holm, objective_variants, paired_p_value, t_interval
from study.figures.common import OBJECTIVE_PALETTE, paired_cell, save_figure, subplots
from study.utils.io import atomic_write_text

__all__ = ["mean_erased_rows", "mean_erased_markdown", "mean_erased_figure", "write_mean_erased", "TABLE"]

TABLE = "mean_erased_cpu.csv"
METRICS = {"knn_top1": "k-NN %", "linear_top1": "linear probe %"}
ARMS = {"cimle-token": "per-token cIMLE", "cimle": "one z per image", "mvae": "Masked VAE"}
COLORS = {"least squares": OBJECTIVE_PALETTE["least squares"], "per-token cIMLE": OBJECTIVE_PALETTE["cIMLE (token)"],
          "one z per image": OBJECTIVE_PALETTE["cIMLE (image, head)"], "Masked VAE": OBJECTIVE_PALETTE["Masked VAE"]}


def _setting(table: pd.DataFrame) -> pd.Series:
    p = table["sign_flip_p"].astype(float)
    return pd.Series(np.where(p == 0, "p = 0", "p = " + p.map("{:g}".format) + ", " + table["sign_flip_scope"].astype(str)),
                     index=table.index)


def mean_erased_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per setting, metric and arm: means in %, the paired difference to LS and its Holm-adjusted p."""
    table = table[(table["pool"] == "mean") & table.metric.isin(list(METRICS))]
    table = table.assign(setting=_setting(table))
    random = table[table.encoder == "random"].groupby("metric").value.mean() * 100
    pretrained = table[table.encoder == "pretrained"]
    pretrained = pretrained.assign(arm=objective_variants(pretrained))
    out = []
    for (setting, metric), part in pretrained.groupby(["setting", "metric"], sort=True):
        wide = part.pivot_table(index="seed", columns="arm", values="value", aggfunc="first") * 100
        ls = wide.get("ls")
        out.append({"setting": setting, "metric": metric, "arm": "least squares", "mean": ls.mean(),
                    "sd": ls.std(), "random": random.get(metric, np.nan)})
        for arm, label in ARMS.items():
            if arm not in wide:
                continue
            diff = (wide[arm] - ls).dropna().to_numpy()
            mean, low, high = t_interval(diff)
            out.append({"setting": setting, "metric": metric, "arm": label, "mean": wide[arm].mean(),
                        "sd": wide[arm].std(), "diff": mean, "low": low, "high": high, "n": len(diff),
                        "p": paired_p_value(diff), "random": random.get(metric, np.nan)})
    rows = pd.DataFrame(out)
    paired = rows["p"].notna()
    rows.loc[paired, "p_holm"] = holm(rows.loc[paired, "p"])
    return rows


def mean_erased_markdown(rows: pd.DataFrame) -> str:
    random = rows.drop_duplicates("metric").set_index("metric").random
    lines = ["Random init: " + ", ".join(f"{METRICS[m]} {v:.1f}" for m, v in random.items()) + ".", "",
             "| sign flips | measure | arm | mean ± sd | it - LS, paired 95% | Holm p |", "|---|---|---|---|---|---|"]
    for r in rows.itertuples():
        cell = "" if pd.isna(getattr(r, "diff", np.nan)) else paired_cell(r.diff, r.low, r.high, 1,
                                                                            bold=bool(r.p_holm < 0.05))
        holm_p = "" if pd.isna(getattr(r, "p_holm", np.nan)) else f"{r.p_holm:.3f}"
        lines.append(f"| {r.setting} | {METRICS[r.metric]} | {r.arm} | {r.mean:.1f} ± {r.sd:.1f} | {cell} | {holm_p} |")
    return "\n".join(lines) + "\n"


def mean_erased_figure(rows: pd.DataFrame, out_dir: str | Path, name: str = "mean_erased") -> list[Path]:
    """One panel per metric: each arm's mean ± sd at each sign-flip setting; random init dashed."""
    settings = list(dict.fromkeys(rows.setting))
    arms = list(dict.fromkeys(rows.arm))
    fig, axes = subplots(1, len(METRICS), figsize=(5.6 * len(METRICS), 3.6), squeeze=False)
    for ax, (metric, label) in zip(axes[0], METRICS.items()):
        part = rows[rows.metric == metric]
        for j, arm in enumerate(arms):
            a = part[part.arm == arm].set_index("setting").reindex(settings)
            x = np.arange(len(settings)) + (j - (len(arms) - 1) / 2) * 0.15
            ax.errorbar(x, a["mean"], yerr=a["sd"], fmt="o", capsize=3, color=COLORS.get(arm, "0.3"), label=arm)
        ax.axhline(part.random.iloc[0], color="0.5", ls="--", lw=1, label="random init")
        ax.set(xticks=np.arange(len(settings)), ylabel=label, title=f"{label} on clean digits")
        ax.set_xticklabels(settings, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("MNIST-5k, ratio 0.75, masked targets' signs flipped with probability p "
                 "(mean ± sd over seeds; every arm on the head)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def write_mean_erased(results: str | Path, out: str | Path) -> list[Path]:
    """``out/mean_erased.{png,pdf}`` and ``out/mean_erased.md`` from the committed table."""
    rows = mean_erased_rows(read_results(Path(results) / TABLE))
    paths = mean_erased_figure(rows, out)
    table = Path(out) / "mean_erased.md"
    atomic_write_text(table, mean_erased_markdown(rows))
    return paths + [table]
