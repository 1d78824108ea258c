"""The toy figure: probe accuracy, the samples' class axis and amplitude, and energy distance against mask strength.

Drawn only from the tidy table that ``toy/regression_to_mean.py`` writes.
Files are byte-identical across reruns: PNG/PDF metadata carry no date.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns

from study.losses import nearest_of_k_amplitude
from study.figures.common import OBJECTIVE_LABELS, OBJECTIVE_PALETTE, save_figure, subplots

__all__ = ["plot_toy", "FIGURE_NAME"]

FIGURE_NAME = "toy_regression_to_mean"
PALETTE = {label: OBJECTIVE_PALETTE[label] for label in ("least squares", "cIMLE")}


def plot_toy(frame: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Panels vs mask strength (probe accuracy; where the table has them, samples on their class's mode axis
    and how far out along it they lie; energy distance); returns the files written."""
    out_dir = Path(out_dir)
    frame = frame.assign(objective=frame.objective.map(OBJECTIVE_LABELS).fillna(frame.objective))
    panels = {"probe_accuracy": "linear probe accuracy of h(x)",
              "axis_accuracy": "samples on their class's mode axis",
              "amplitude": "how far out along the axis",
              "energy_distance": "energy distance to p(y | c)"}
    panels = {m: t for m, t in panels.items() if m in set(frame.metric)}
    trained = frame[frame.metric.isin(list(panels))]
    untrained = frame[frame.metric == "probe_accuracy_untrained"]
    chance = 1.0 / frame["n_classes"].iloc[0]

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2))
    for ax, (metric, title) in zip(axes, panels.items()):
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
    for ax, metric in zip(axes, panels):
        if metric == "axis_accuracy":
            ax.axhline(chance, color="black", linestyle=":", linewidth=1)
            ax.set(ylim=(0, 1.02), ylabel="fraction of samples")
        elif metric == "amplitude":
            k = int(frame.loc[frame.objective == "cIMLE", "k"].iloc[0])
            ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="the task's modes")
            ax.axhline(nearest_of_k_amplitude(k), color="grey", linestyle="--", linewidth=1,
                       label=f"nearest-of-{k}'s optimum")
            ax.set(ylim=(0, 1.45), ylabel="fraction of the mode radius")
            ax.legend(title=None, fontsize=8, loc="upper center", ncol=2)
        elif metric == "energy_distance":
            ax.set(ylim=(0, None), ylabel="energy distance (lower is better)")
    fig.tight_layout()

    paths = save_figure(fig, out_dir, FIGURE_NAME, bbox_inches="tight")
    return paths
