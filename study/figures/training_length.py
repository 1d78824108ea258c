"""Training length: does cIMLE's gap to least squares on MNIST close, hold or open with epochs?

From ``results/training_length_cpu.csv`` (``make training-length``): LS, cIMLE with
one noise vector per image and per-token cIMLE, 150 epochs at mask ratio 0.75 and
0.9, the seeds the table holds (the sweep names 5), each run's snapshots (10, 20,
40, 60, 100 epochs) and final encoder evaluated by k-NN and the linear probe on
mean-pooled features.

Each snapshot is paired with the LS run of the same seed, ratio and epoch on the same decoder
(:func:`study.evaluation.statistics.paired_differences`); the table's p-values are Holm-adjusted over
all its cells (the primary comparison, named in docs/expectations.md, is read at 150 epochs). A snapshot of a 150-epoch run
is not a 60-epoch run: its learning rate is still high there, so the curve
shows one schedule's trajectory, and the claim is read at its end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from study.figures.common import OBJECTIVE_LABELS, OBJECTIVE_PALETTE, paired_cell, save_figure, subplots
from study.utils.io import atomic_write_text
from study.evaluation.results import read_results
from study.evaluation.statistics import decoders, equivalence, holm, objective_variants, paired_differences

__all__ = ["training_length_rows", "training_length_figure", "training_length_markdown", "write_training_length",
           "TABLE"]

TABLE = "training_length_cpu.csv"
METRICS = {"knn_top1": "k-NN %", "linear_top1": "linear probe %"}
VARIANTS = {"cimle": "per image", "cimle-head": "per image, head", "cimle-token": "per token", "mvae": "Masked VAE"}


def training_length_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per objective, ratio, epoch and metric: mean and sd over seeds, in %;
    per variant, ratio, epoch and metric: the paired difference to LS with its 95% interval, in %)."""
    table = table[(table.pool == "mean") & table.metric.isin(list(METRICS))]
    pretrained = table[table.encoder == "pretrained"].assign(objective=lambda t: objective_variants(t))
    curves = (pretrained.groupby(["mask_ratio", "metric", "objective", "epochs"]).value
              .agg(["mean", "std", "count"]).mul([100, 100, 1]).reset_index())
    random = table[table.encoder == "random"].drop_duplicates(["seed", "metric"])
    random = random.groupby("metric").value.mean().mul(100).rename("random").reset_index()
    curves = curves.merge(random, on="metric", how="left")
    paired = paired_differences(table, metrics=tuple(METRICS))
    paired = paired.assign(**{c: paired[c] * 100 for c in ("mean_diff", "ci_low", "ci_high", "objective_mean",
                                                           "baseline_mean")}, p_holm=holm(paired.p))
    return curves, paired[["mask_ratio", "metric", "objective", "epochs", "n", "mean_diff", "ci_low", "ci_high",
                           "excludes_zero", "p", "p_holm", "objective_mean", "baseline_mean"]]


def training_length_figure(curves: pd.DataFrame, paired: pd.DataFrame, out_dir: str | Path,
                           name: str = "training_length") -> list[Path]:
    """Columns: the mask ratios. Rows: k-NN against epochs (mean ± sd); then, per metric, cIMLE - LS
    (paired, 95% interval) against epochs."""
    ratios = sorted(curves.mask_ratio.unique())
    fig, axes = subplots(1 + len(METRICS), len(ratios), figsize=(4.8 * len(ratios), 9.0), squeeze=False,
                         sharex=True)
    for j, ratio in enumerate(ratios):
        ax = axes[0, j]
        part = curves[(curves.mask_ratio == ratio) & (curves.metric == "knn_top1")]
        for objective, group in part.groupby("objective", sort=True):
            label = OBJECTIVE_LABELS.get(objective, objective)
            ax.errorbar(group.epochs, group["mean"], yerr=group["std"].fillna(0.0), marker="o", ms=4, capsize=2,
                        color=OBJECTIVE_PALETTE.get(label, "0.3"), label=label)
        if len(part) and np.isfinite(part.random.iloc[0]):
            ax.axhline(part.random.iloc[0], color="0.5", ls="--", lw=1, label="random init")
        seeds = int(part["count"].max()) if len(part) else 0
        ax.set_title(f"MNIST-5k, ratio {ratio:g} ({seeds} seeds)", fontsize=9)
        ax.set_ylabel(METRICS["knn_top1"] if j == 0 else "")
        ax.legend(fontsize=7)
        for i, (metric, label) in enumerate(METRICS.items(), start=1):
            ax = axes[i, j]
            part = paired[(paired.mask_ratio == ratio) & (paired.metric == metric)]
            for objective, group in part.groupby("objective", sort=True):
                group = group.sort_values("epochs")
                name_ = OBJECTIVE_LABELS.get(objective, objective)
                color = OBJECTIVE_PALETTE.get(name_, "0.3")
                ax.plot(group.epochs, group.mean_diff, marker="o", ms=4, color=color, label=f"{name_} - LS")
                ax.fill_between(group.epochs, group.ci_low, group.ci_high, color=color, alpha=0.2, lw=0)
            ax.axhline(0.0, color="0.2", lw=0.8)
            ax.set_ylabel(f"{label}: objective - LS, paired 95%" if j == 0 else "")
            ax.legend(fontsize=7)
        axes[-1, j].set_xlabel("pretraining epochs (snapshots of 150-epoch runs)")
    fig.set_layout_engine("constrained")
    return save_figure(fig, out_dir, name)


def training_length_markdown(paired: pd.DataFrame) -> str:
    """One row per (ratio, variant, epoch): both metrics' means and paired differences (LS on the same
    decoder; bold: Holm-adjusted p < 0.05 over the whole table)."""
    lines = ["| ratio | objective | epochs | seeds | k-NN: it | LS | it - LS, paired 95% | Holm p | linear: it | LS |"
             " it - LS, paired 95% | Holm p |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    wide = paired.set_index(["mask_ratio", "objective", "epochs", "metric"]).sort_index()
    for (ratio, objective, epochs), group in wide.groupby(level=[0, 1, 2], sort=True):
        cells = []
        for metric in METRICS:
            if (ratio, objective, epochs, metric) not in group.index:
                cells.append("- | - | - | -")
                continue
            r = group.loc[(ratio, objective, epochs, metric)]
            cells.append(f"{r.objective_mean:.1f} | {r.baseline_mean:.1f} | "
                         + paired_cell(r.mean_diff, r.ci_low, r.ci_high, 1, bold=bool(r.p_holm < 0.05))
                         + f" | {r.p_holm:.3f}")
        variant = VARIANTS.get(objective, objective)
        lines.append(f"| {ratio:g} | {variant} | {int(epochs)} | {int(group.n.max())} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LEVEL_BOUND = 2.0  # accuracy points: "level" only inside it (docs/expectations.md)


def final_equivalence(table: pd.DataFrame) -> str:
    """At the last epoch, per ratio, variant and metric: two one-sided tests of |cIMLE - LS| < 2 points
    (LS on the same decoder), as a markdown table."""
    last = table[(table.encoder == "pretrained") & (table.pool == "mean") & (table.epochs == table.epochs.max())]
    last = last.assign(variant=objective_variants(last), decoder=decoders(last))
    lines = [f"At {int(last.epochs.max())} epochs, two one-sided tests of |it - LS| < {LEVEL_BOUND:g} points:", "",
             "| ratio | objective | metric | it - LS, 90% | level? |", "|---|---|---|---|---|"]
    for (ratio, metric), part in last.groupby(["mask_ratio", "metric"]):
        if metric not in METRICS:
            continue
        for (variant, decoder), arm in part.groupby(["variant", "decoder"]):
            base = part[part.variant.str.fullmatch("ls(-head)?") & (part.decoder == decoder)]
            if variant.startswith("ls") or not len(base):
                continue
            diff = (arm.groupby("seed").value.first() - base.groupby("seed").value.first()).dropna() * 100
            eq = equivalence(diff.to_numpy(), LEVEL_BOUND)
            lines.append(f"| {ratio:g} | {VARIANTS.get(variant, variant)} | {METRICS[metric]} | "
                         f"{paired_cell(eq['mean'], eq['low'], eq['high'], 1, bold=False)} | {eq['verdict']} |")
    return "\n".join(lines) + "\n"


def write_training_length(results: str | Path, out: str | Path) -> list[Path]:
    """``out/training_length.{png,pdf}`` and the table ``out/training_length.md``, from the committed table."""
    table = read_results(Path(results) / TABLE)
    curves, paired = training_length_rows(table)
    paths = training_length_figure(curves, paired, out)
    markdown = Path(out) / "training_length.md"
    atomic_write_text(markdown, training_length_markdown(paired) + "\n" + final_equivalence(table))
    return paths + [markdown]
