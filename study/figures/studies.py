"""Figures and tables of the papermill studies, drawn only from the tidy results table.

* mask strength: linear probe and k-NN accuracy against the mask ratio, per
  dataset and mask kind, LS vs cIMLE (vs Masked VAE), mean and 95% interval
  over seeds, with the random-init encoder as a dashed baseline;
* efficiency: the same metrics against pretraining epochs and wall-clock seconds;
* noise block: cIMLE with noise at the decoder input vs at its last block;
* paired differences: objective - LS with the same seed, mean and 95% t-interval
  (``study.evaluation.statistics``), the comparison that can tell objectives apart.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns

from study.figures.common import OBJECTIVE_LABELS, OBJECTIVE_PALETTE, save_figure, subplots
from study.evaluation.statistics import objective_variants, paired_differences

__all__ = ["mask_strength_figure", "mask_strength_table", "efficiency_figure", "efficiency_table",
           "noise_block_figure", "noise_block_table", "paired_difference_figure", "paired_difference_table"]

METRICS = {"linear_top1": "linear probe top-1", "knn_top1": "k-NN top-1"}


def _accuracy_rows(table: pd.DataFrame) -> pd.DataFrame:
    missing = {"metric", "value", "objective", "encoder", "seed"} - set(table.columns)
    if missing:
        raise ValueError(f"results table lacks columns {sorted(missing)}")
    rows = table[table.metric.isin(list(METRICS))].copy()
    if rows.empty:
        raise ValueError(f"results table has no rows with metric in {list(METRICS)}")
    rows["objective"] = objective_variants(rows)
    rows["objective"] = rows.objective.map(OBJECTIVE_LABELS).fillna(rows.objective)
    rows["metric"] = rows.metric.map(METRICS)
    rows["panel"] = rows.dataset.astype(str) + " / " + rows.mask_kind.astype(str)
    if "pool" in rows.columns and rows["pool"].nunique() > 1:
        rows["panel"] += " / " + rows["pool"].astype(str) + " features"
    return rows


def _mean_std(frame: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    if "pool" in frame.columns:
        index = index + ["pool"]
    stats = frame.groupby(index + ["objective", "metric"]).value.agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [f"{100 * m:.1f} ± {100 * (0 if pd.isna(s) else s):.1f} (n={n})"
                     for m, s, n in zip(stats["mean"], stats["std"], stats["count"])]
    return stats.pivot_table(index=index, columns=["metric", "objective"], values="cell", aggfunc="first")


def _save_with_shared_legend(fig, axes, out_dir: str | Path, name: str) -> list[Path]:
    """Move the first panel's legend below the grid, save PNG + PDF, close the figure."""
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if axes[0, 0].get_legend():
        axes[0, 0].get_legend().remove()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    paths = save_figure(fig, out_dir, name)
    return paths


def mask_strength_table(table: pd.DataFrame) -> pd.DataFrame:
    """Accuracy in percent, mean ± std over seeds, per dataset, mask kind and ratio."""
    rows = _accuracy_rows(table)
    pretrained = rows[rows.encoder == "pretrained"]
    # the random-init encoder depends only on the seed: count it once per seed and show it at every
    # mask setting, whichever points evaluated it (all of a seed's, or one: random_baseline: once_per_seed)
    baseline = rows[rows.encoder == "random"].assign(objective="random init")
    baseline = baseline.drop_duplicates([c for c in ("dataset", "seed", "metric", "pool", "knn_k", "finetune_seed")
                                         if c in baseline.columns])
    settings = pretrained[["dataset", "mask_kind", "mask_ratio"]].drop_duplicates()
    baseline = baseline.drop(columns=["mask_kind", "mask_ratio"]).merge(settings, on="dataset")
    return _mean_std(pd.concat([pretrained, baseline]), ["dataset", "mask_kind", "mask_ratio"])


def mask_strength_figure(table: pd.DataFrame, out_dir: str | Path, name: str = "mask_strength") -> list[Path]:
    rows = _accuracy_rows(table)
    pretrained = rows[rows.encoder == "pretrained"]
    baseline = rows[rows.encoder == "random"]
    panels = sorted(rows.panel.unique())
    metrics = list(METRICS.values())
    fig, axes = subplots(len(metrics), len(panels), figsize=(4.2 * len(panels), 3.4 * len(metrics)),
                             squeeze=False, sharex=True)
    for col, panel in enumerate(panels):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            data = pretrained[(pretrained.panel == panel) & (pretrained.metric == metric)]
            sns.lineplot(data=data, x="mask_ratio", y="value", hue="objective", palette=OBJECTIVE_PALETTE,
                         errorbar=("ci", 95), n_boot=1000, seed=0, marker="o", ax=ax,
                         legend=(row == 0 and col == 0))
            base = baseline[(baseline.panel == panel) & (baseline.metric == metric)]
            if len(base):
                ax.axhline(base.value.mean(), color="0.5", ls="--", lw=1, label="random init")
            ax.set_title(panel if row == 0 else "")
            ax.set_xlabel("mask ratio")
            ax.set_ylabel(metric if col == 0 else "")
            ax.grid(alpha=0.3)
    return _save_with_shared_legend(fig, axes, out_dir, name)


def efficiency_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = _accuracy_rows(table)
    return _mean_std(rows[rows.encoder == "pretrained"], ["dataset", "mask_kind", "mask_ratio", "epochs"])


def efficiency_figure(table: pd.DataFrame, out_dir: str | Path, name: str = "efficiency") -> list[Path]:
    rows = _accuracy_rows(table)
    pretrained = rows[rows.encoder == "pretrained"]
    baseline = rows[rows.encoder == "random"]
    panels = sorted(pretrained.panel.unique())
    metrics = list(METRICS.values())
    xs = [("epochs", "pretraining epochs"), ("train_seconds", "pretraining wall-clock (s)")]
    fig, axes = subplots(len(metrics), len(xs) * len(panels),
                             figsize=(4.0 * len(xs) * len(panels), 3.4 * len(metrics)), squeeze=False)
    for p, panel in enumerate(panels):
        for j, (x, label) in enumerate(xs):
            col = p * len(xs) + j
            for row, metric in enumerate(metrics):
                ax = axes[row, col]
                data = pretrained[(pretrained.panel == panel) & (pretrained.metric == metric)]
                if x == "train_seconds":
                    _mean_curve_over_seeds(data, ax)
                else:
                    sns.lineplot(data=data, x=x, y="value", hue="objective", palette=OBJECTIVE_PALETTE,
                                 errorbar=("ci", 95), n_boot=1000, seed=0, marker="o", ax=ax,
                                 legend=(row == 0 and col == 0))
                base = baseline[(baseline.panel == panel) & (baseline.metric == metric)]
                if len(base):
                    ax.axhline(base.value.mean(), color="0.5", ls="--", lw=1, label="random init")
                ratio = ", ".join(f"{r:g}" for r in sorted(data.mask_ratio.unique()))
                ax.set_title(f"{panel}, ratio {ratio}" if row == 0 else "")
                ax.set_xlabel(label)
                ax.set_ylabel(metric if col == 0 else "")
                ax.grid(alpha=0.3)
    return _save_with_shared_legend(fig, axes, out_dir, name)


def _mean_curve_over_seeds(data: pd.DataFrame, ax) -> None:
    """Seeds differ in wall-clock: one line per objective through (mean seconds, mean accuracy) at
    each snapshot, with the seeds' std as error bars on both axes (joining raw points zigzags)."""
    for objective, part in data.groupby("objective", sort=True):
        stats = part.groupby("epochs").agg(t=("train_seconds", "mean"), t_sd=("train_seconds", "std"),
                                          v=("value", "mean"), v_sd=("value", "std")).fillna(0.0)
        ax.errorbar(stats.t, stats.v, xerr=stats.t_sd, yerr=stats.v_sd, marker="o", ms=4, capsize=2,
                    color=OBJECTIVE_PALETTE.get(objective, "0.3"), label=objective)


def noise_block_table(table: pd.DataFrame) -> pd.DataFrame:
    rows = _accuracy_rows(table)
    pretrained = rows[rows.encoder == "pretrained"]
    baseline = rows[rows.encoder == "random"].drop_duplicates(
        [c for c in ("seed", "metric", "pool", "knn_k", "finetune_seed") if c in rows.columns]).assign(
        objective="random init", noise_block="-")
    return _mean_std(pd.concat([pretrained, baseline]), ["dataset", "mask_ratio", "noise_block"])


def _noise_place(block, depth: int) -> str:
    """A noise_block value (an int, or "head" after the last attention) as an axis label."""
    if str(block) == "head":
        return "token-wise head"
    b = int(block)
    return f"block {b}" + (" (input)" if b == 0 else " (last)" if b == depth - 1 else "")


def noise_block_figure(table: pd.DataFrame, out_dir: str | Path, name: str = "noise_block") -> list[Path]:
    """Accuracy per seed and mean with 95% interval, for each decoder block where the noise enters."""
    rows = _accuracy_rows(table)
    pretrained = rows[rows.encoder == "pretrained"].copy()
    depth = int(pretrained.decoder_depth.max())
    pretrained["where"] = [_noise_place(b, depth) for b in pretrained.noise_block]
    baseline = rows[rows.encoder == "random"].copy()
    if "pool" not in pretrained.columns:
        pretrained["pool"] = baseline["pool"] = "cls"
    cimle = pretrained[~pretrained.objective.str.startswith("least squares")].assign(arm="cIMLE")
    order = sorted(cimle["where"].unique())
    # least squares on each placement's model: the plain decoder (z = 0 at a block adds exactly 0), or the head
    ls = pretrained[pretrained.objective.str.startswith("least squares")]
    twins = [ls[(ls.noise_block.astype(str) == "head") == (w == "token-wise head")].assign(where=w) for w in order]
    data_all = pd.concat([cimle] + [t.assign(arm="least squares, same model") for t in twins])
    palette = {"cIMLE": OBJECTIVE_PALETTE["cIMLE"], "least squares, same model": OBJECTIVE_PALETTE["least squares"]}
    panels = [(m, p) for p in sorted(pretrained["pool"].unique()) for m in METRICS.values()]
    fig, axes = subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (metric, pool) in zip(axes[0], panels):
        data = data_all[(data_all.metric == metric) & (data_all["pool"] == pool)]
        sns.pointplot(data=data, x="where", y="value", hue="arm", order=order, errorbar=("ci", 95), n_boot=1000,
                      seed=0, palette=palette, linestyle="none", capsize=0.1, dodge=0.4, ax=ax)
        sns.stripplot(data=data, x="where", y="value", hue="arm", order=order, palette=["0.3", "0.3"], size=4,
                      jitter=False, dodge=True, legend=False, ax=ax)
        base = baseline[(baseline.metric == metric) & (baseline["pool"] == pool)]
        if len(base):
            ax.axhline(base.value.mean(), color="0.5", ls="--", lw=1, label="random init")
            ax.legend(frameon=False, fontsize=8)
        ratio = ", ".join(f"{r:g}" for r in sorted(data.mask_ratio.unique()))
        ax.set(title=f"{metric}, {pool} (ratio {ratio})", xlabel="noise enters decoder at", ylabel="accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = save_figure(fig, out_dir, name)
    return paths


def _paired_or_none(table: pd.DataFrame, baseline: str) -> pd.DataFrame | None:
    """The paired differences to ``baseline``, or None where the table has no pair."""
    objectives = set(objective_variants(table[table.encoder == "pretrained"])) if "encoder" in table else set()
    if baseline not in objectives or len(objectives) < 2:
        return None
    diffs = paired_differences(table, baseline)
    return diffs if len(diffs) else None


def paired_difference_table(table: pd.DataFrame, baseline: str = "ls") -> pd.DataFrame:
    """Objective - LS per seed, mean and 95% t-interval in accuracy points; ``*`` where it excludes 0.

    Empty when no objective shares a seed and setting with LS (a sweep of a few points)."""
    diffs = _paired_or_none(table, baseline)
    if diffs is None:
        return pd.DataFrame()
    diffs["cell"] = [f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{' *' if ex else ''} (n={n})"
                     for m, lo, hi, ex, n in zip(diffs.mean_diff, diffs.ci_low, diffs.ci_high, diffs.excludes_zero,
                                                 diffs.n)]
    diffs["metric"] = diffs.metric.map(METRICS)
    diffs["objective"] = diffs.objective.map(OBJECTIVE_LABELS).fillna(diffs.objective) + " - LS"
    index = [k for k in ("dataset", "mask_kind", "mask_ratio", "epochs") if k in diffs.columns]
    return diffs.pivot_table(index=index, columns=["pool", "metric", "objective"], values="cell", aggfunc="first")


def paired_difference_figure(table: pd.DataFrame, out_dir: str | Path, name: str = "paired_differences",
                             baseline: str = "ls") -> list[Path]:
    """Per mask setting: objective - LS (same seed), mean and 95% t-interval over seeds, in accuracy points.

    Filled markers: the interval excludes 0; open markers: no difference detected. No figure (an empty
    list) when no objective shares a seed and setting with LS.
    """
    diffs = _paired_or_none(table, baseline)
    if diffs is None:
        return []
    diffs["label"] = diffs.objective.map(OBJECTIVE_LABELS).fillna(diffs.objective)
    diffs["setting"] = [f"{kind} {ratio:g}" for kind, ratio in zip(diffs.mask_kind, diffs.mask_ratio)]
    if "dataset" in diffs.columns and diffs.dataset.nunique() > 1:
        diffs["setting"] = diffs.dataset.astype(str) + " " + diffs.setting
    if "epochs" in diffs.columns and diffs.epochs.nunique() > 1:
        diffs["setting"] += ", " + diffs.epochs.astype(str) + " ep"
    order = [c for c in ("dataset", "mask_kind", "mask_ratio", "epochs") if c in diffs.columns]
    settings = list(dict.fromkeys(diffs.sort_values(order).setting))
    pools = sorted(diffs["pool"].unique()) if "pool" in diffs.columns else ["-"]
    labels = sorted(diffs.label.unique())
    fig, axes = subplots(len(pools), len(METRICS), figsize=(1.0 * len(settings) + 3.5, 3.0 * len(pools)),
                             squeeze=False, sharey="row")
    width = 0.6 / max(len(labels), 1)
    for r, pool in enumerate(pools):
        for c, (metric, title) in enumerate(METRICS.items()):
            ax = axes[r, c]
            for j, label in enumerate(labels):
                part = diffs[(diffs.metric == metric) & (diffs.label == label)]
                if "pool" in part.columns:
                    part = part[part["pool"] == pool]
                part = part.set_index("setting").reindex(settings).dropna(subset=["mean_diff"])
                x = [settings.index(s) + (j - (len(labels) - 1) / 2) * width for s in part.index]
                y = 100 * part.mean_diff
                err = [100 * (part.mean_diff - part.ci_low), 100 * (part.ci_high - part.mean_diff)]
                color = OBJECTIVE_PALETTE.get(label, "0.3")
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor=color, capsize=3, lw=1.2, label=f"{label} - LS")
                filled = part.excludes_zero.astype(bool).to_numpy()
                ax.scatter([xi for xi, f in zip(x, filled) if f], y[filled], color=color, zorder=3)
                ax.scatter([xi for xi, f in zip(x, filled) if not f], y[~filled], facecolor="white",
                           edgecolor=color, zorder=3)
            ax.axhline(0, color="0.3", lw=1)
            ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right")
            ax.set_title(f"{title}, {pool} features" if pool != "-" else title)
            ax.set_ylabel("difference to LS (points)" if c == 0 else "")
            ax.grid(alpha=0.3, axis="y")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=max(len(names), 1), frameon=False,
               title="same seed, mean and 95% t-interval; filled: interval excludes 0", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths = save_figure(fig, out_dir, name)
    return paths
