"""Figures and tables of the same-mean synthetic images, drawn only from the tidy results tables.

* ``synthetic_figure``: linear probe accuracy against the class mean shift (the
  toy's 1 - s), one panel per pooling, per objective variant (least squares,
  cIMLE with one z per image, per-token cIMLE, Masked VAE), with the random-init
  encoder dashed and chance dotted; also against the mask ratio when the table
  holds a ratio axis.
* ``tradeoff_figure``: random-init, LS and cIMLE-token probes against the
  cue-to-distractor ratio (``synthetic_cue / synthetic_distractor``).
* ``synthetic_table``: every metric, mean ± std over seeds.

One sweep (``experiments/sweeps/synthetic_cpu.yaml``) varies one axis at a time
away from the default point; :func:`axis_slice` keeps the rows of one axis
(the other two at their defaults), so the default point is trained once and
appears on all three axes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns

from study.figures.common import OBJECTIVE_PALETTE, save_figure, subplots

__all__ = ["DEFAULT_POINT", "axis_slice", "probe_rows", "variant_labels", "synthetic_figure", "tradeoff_figure",
           "synthetic_table"]

# experiments/configs/synthetic.yaml's values of the three swept axes (a test keeps them in step)
DEFAULT_POINT = {"synthetic_mean_shift": 0.0, "mask_ratio": 0.75, "synthetic_distractor": 0.75}

PALETTE = {"least squares": OBJECTIVE_PALETTE["least squares"], "cIMLE (image)": "#66a61e",
           "cIMLE (token)": OBJECTIVE_PALETTE["cIMLE"], "Masked VAE": OBJECTIVE_PALETTE["Masked VAE"],
           "random init": "grey"}


def axis_slice(table: pd.DataFrame, axis: str) -> pd.DataFrame:
    """The rows along ``axis``: every other swept axis at its default value (columns the table lacks are free)."""
    keep = pd.Series(True, index=table.index)
    for column, value in DEFAULT_POINT.items():
        if column != axis and column in table.columns:
            keep &= (table[column] - value).abs() < 1e-9
    return table[keep]


def variant_labels(table: pd.DataFrame) -> pd.Series:
    """One label per row: the objective, and for cIMLE its selection (image / token)."""
    select = table["cimle_select"] if "cimle_select" in table.columns else pd.Series("image", index=table.index)
    names = {"ls": "least squares", "mvae": "Masked VAE"}
    return pd.Series([names.get(o) or f"cIMLE ({s})" for o, s in zip(table.objective, select)], index=table.index)


def probe_rows(table: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Linear-probe rows with a ``variant`` column: the pretrained encoders, plus the random-init
    encoder once per (``axis`` value, seed, pool) under the variant "random init"."""
    rows = table[(table.metric == "linear_top1")].copy()
    if rows.empty:
        raise ValueError("results table has no linear_top1 rows")
    rows["variant"] = variant_labels(rows)
    random = rows[rows.encoder == "random"].drop_duplicates([axis, "seed", "pool"]).assign(variant="random init")
    return pd.concat([rows[rows.encoder == "pretrained"], random])


def _probe_panels(rows: pd.DataFrame, axis: str, xlabel: str, hue_order: list[str], out_dir, name: str,
                  chance: float) -> list[Path]:
    pools = sorted(rows["pool"].dropna().unique())
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = subplots(1, len(pools), figsize=(4.2 * len(pools), 3.4), squeeze=False)
    for ax, pool in zip(axes[0], pools):
        part = rows[rows["pool"] == pool]
        order = [h for h in hue_order if h in set(part.variant)]
        sns.lineplot(data=part, x=axis, y="value", hue="variant", hue_order=order, palette=PALETTE,
                     style="variant", style_order=order,
                     dashes={v: ((4, 2) if v == "random init" else "") for v in order}, markers=True,
                     errorbar="sd", ax=ax)
        ax.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"chance (1/{round(1 / chance)})")
        ax.set(title=f"linear probe, {pool} features", xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.02))
        ax.legend(title=None, fontsize=7)
    fig.tight_layout()
    paths = save_figure(fig, out_dir, name, bbox_inches="tight")
    return paths


def _chance(table: pd.DataFrame) -> float:
    for column in ("synthetic_classes", "num_classes"):
        if column in table.columns and table[column].notna().any():
            return 1.0 / float(table[column].dropna().iloc[0])
    return 0.25  # the synthetic config's 4 classes


def synthetic_figure(table: pd.DataFrame, out_dir: str | Path, name: str = "synthetic_cpu",
                     axis: str = "synthetic_mean_shift") -> list[Path]:
    """Probe accuracy against ``axis`` (mean shift, or mask_ratio), per pooling and objective variant."""
    rows = probe_rows(axis_slice(table, axis), axis)
    xlabel = {"synthetic_mean_shift": "class mean shift (toy: 1 - s)", "mask_ratio": "mask ratio"}.get(axis, axis)
    return _probe_panels(rows, axis, xlabel, list(PALETTE), out_dir, name, _chance(table))


def tradeoff_figure(table: pd.DataFrame, out_dir: str | Path, name: str = "synthetic_tradeoff") -> list[Path]:
    """Random-init, LS and cIMLE-token probes against the cue-to-distractor ratio."""
    table = axis_slice(table, "synthetic_distractor")
    table = table.assign(cue_to_distractor=table.synthetic_cue / table.synthetic_distractor)
    rows = probe_rows(table, "cue_to_distractor")
    rows = rows[rows.variant.isin(["random init", "least squares", "cIMLE (token)"])]
    return _probe_panels(rows, "cue_to_distractor", "cue-to-distractor ratio (cue / distractor std)",
                         ["random init", "least squares", "cIMLE (token)"], out_dir, name, _chance(table))


def synthetic_table(table: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    """Every metric, mean ± std (n) over seeds, per ``index`` + pool + variant + encoder."""
    rows = table.assign(variant=variant_labels(table))
    keys = [c for c in index + ["pool", "variant", "encoder", "metric"] if c in rows.columns]
    rows = rows.assign(pool=rows["pool"].fillna("-")) if "pool" in rows.columns else rows
    stats = rows.groupby(keys, dropna=False).value.agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [f"{m:.4f} ± {0 if pd.isna(s) else s:.4f} (n={n})"
                     for m, s, n in zip(stats["mean"], stats["std"], stats["count"])]
    return stats.pivot_table(index=[k for k in keys if k != "metric"], columns="metric", values="cell",
                             aggfunc="first")
