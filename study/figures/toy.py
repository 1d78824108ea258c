"""The toy figure: probe accuracy and energy distance against mask strength, LS vs cIMLE.

Drawn only from the tidy table that ``toy/regression_to_mean.py`` writes.
Files are byte-identical across reruns: PNG/PDF metadata carry no date.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns

from study.figures.common import OBJECTIVE_LABELS, OBJECTIVE_PALETTE, save_figure, subplots

__all__ = ["plot_toy", "FIGURE_NAME"]

FIGURE_NAME = "toy_regression_to_mean"
PALETTE = {label: OBJECTIVE_PALETTE[label] for label in ("least squares", "cIMLE")}


def plot_toy(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Two panels (probe accuracy, energy distance) vs mask strength; returns the files written."""
    out_dir = Path(out_dir)
    frame = frame.assign(objective=frame.objective.map(OBJECTIVE_LABELS).fillna(frame.objective))
    trained = frame[frame.metric.isin(["probe_accuracy", "energy_distance"])]
    untrained = frame[frame.metric == "probe_accuracy_untrained"]
    chance = 1.0 / frame["n_classes"].iloc[0]

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = subplots(1, 2, figsize=(8.0, 3.2))
    for ax, metric, title in zip(axes, ["probe_accuracy", "energy_distance"],
                                 ["linear probe accuracy of h(x)", "energy distance to p(y | c)"]):
        sns.lineplot(data=trained[trained.metric == metric], x="mask_strength", y="value", hue="objective",
                     hue_order=list(PALETTE), palette=PALETTE, style="objective", markers=True, dashes=False,
                     errorbar="sd", ax=ax)
        ax.set(title=title, xlabel="mask strength s", ylabel=None)
        ax.legend(title=None, fontsize=8)
    probe_ax = axes[0]
    sns.lineplot(data=untrained, x="mask_strength", y="value", color="grey", linestyle="--", errorbar="sd",
                 ax=probe_ax, label="untrained encoder")
    probe_ax.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance (1/{round(1 / chance)})")
    probe_ax.set(ylim=(0, 1.02), ylabel="accuracy")
    probe_ax.legend(title=None, fontsize=8, loc="center left")
    axes[1].set(ylim=(0, None), ylabel="energy distance (lower is better)")
    fig.tight_layout()

    paths = save_figure(fig, out_dir, FIGURE_NAME, bbox_inches="tight")
    return paths
