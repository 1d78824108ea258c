"""The ladder side by side: the toy, the same-mean synthetic images and MNIST, LS against cIMLE.

One row per (rung, cIMLE variant), each against least squares on the same model, from
the committed tables: the toy's class probe at s = 1, the synthetic images' linear
probe at the default point, MNIST-5k's k-NN at ratio 0.9 after the full 150-epoch
recipe. Mean pooling; paired differences (same seed) with 95% t-intervals
(:mod:`study.evaluation.statistics`). ``make figures`` writes the figure and the
README's table (:func:`headline_markdown`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from study.figures.common import OBJECTIVE_PALETTE, paired_cell, save_figure, subplots
from study.figures.synthetic import axis_slice
from study.utils.io import atomic_write_text
from study.evaluation.results import read_results
from study.evaluation.statistics import decoders, objective_variants, paired_differences, t_interval

__all__ = ["headline_rows", "headline_markdown", "headline_figure", "write_headline", "FIGURE_NAME", "TABLE_NAME"]

FIGURE_NAME = "headline"
TABLE_NAME = "headline.md"
COLUMNS = ["rung", "study", "measure", "seeds", "random", "ls_label", "ls", "ls_sd", "variant", "cimle", "cimle_sd",
           "diff", "low", "high"]
# (objective variant, decoder) -> label, in the order the rows are shown
VARIANTS = {("cimle-token", "head"): "per token", ("cimle", "head"): "per image, head",
            ("cimle-head", "head"): "per image, head", ("cimle", "plain"): "per image"}
LS_LABELS = {"head": "LS (head at z = 0)", "plain": "LS"}


def _toy(results: Path) -> list[dict]:
    t = read_results(results / "toy" / "toy_results.csv")
    t = t[(t.mask_strength == 1.0)]
    probe = t[t.metric == "probe_accuracy"].pivot_table(index="seed", columns="objective", values="value")
    random = t[(t.metric == "probe_accuracy_untrained") & (t.objective == "ls")].value.mean()
    diff, low, high = t_interval((probe["cimle"] - probe["ls"]).to_numpy())
    return [{"rung": "toy, s = 1", "study": "toy", "measure": "class probe", "seeds": len(probe), "random": random,
             "ls_label": "LS", "ls": probe["ls"].mean(), "ls_sd": probe["ls"].std(), "variant": "one z per example",
             "cimle": probe["cimle"].mean(), "cimle_sd": probe["cimle"].std(), "diff": diff, "low": low,
             "high": high}]


def _paired(table: pd.DataFrame, rung: str, study: str, measure: str, metric: str, scale: float) -> list[dict]:
    """The rows of a sweep table already cut to one setting: each cIMLE variant against LS on its decoder."""
    table = table[(table.pool == "mean") & (table.metric == metric)]
    pretrained = table[table.encoder == "pretrained"]
    arms = pretrained.assign(variant=objective_variants(pretrained), decoder=decoders(pretrained))
    random = table[table.encoder == "random"].groupby("seed").value.first().mean() * scale
    pairs = paired_differences(table, metrics=(metric,))
    rows = []
    for (variant, decoder), label in VARIANTS.items():
        p = pairs[(pairs.objective == variant) & (pairs.decoder == decoder)]
        if not len(p):
            continue
        if len(p) != 1:
            raise ValueError(f"{rung}: {len(p)} settings of {label} to pair with LS; expected one")
        p = p.iloc[0]
        own = arms[(arms.variant == variant) & (arms.decoder == decoder)].value * scale
        ls = arms[arms.variant.str.fullmatch("ls(-head)?") & (arms.decoder == decoder)].value * scale
        rows.append({"rung": rung, "study": study, "measure": measure, "seeds": int(p.n), "random": random,
                     "ls_label": LS_LABELS[decoder], "ls": ls.mean(), "ls_sd": ls.std(), "variant": label,
                     "cimle": own.mean(), "cimle_sd": own.std(), "diff": p.mean_diff * scale,
                     "low": p.ci_low * scale, "high": p.ci_high * scale})
    if not rows:
        raise ValueError(f"{rung}: no cIMLE variant has a least-squares twin on its decoder in {study}")
    return rows


def headline_rows(results: str | Path) -> pd.DataFrame:
    results = Path(results)
    synthetic = axis_slice(read_results(results / "synthetic_cpu.csv"), axis="")  # the default point
    mnist = read_results(results / "training_length_cpu.csv")
    mnist = mnist[(mnist.epochs == mnist.epochs.max()) & (mnist.mask_ratio == 0.9)]
    rows = (_toy(results)
            + _paired(synthetic, "same-mean synthetic images", "synthetic", "linear probe", "linear_top1", 1.0)
            + _paired(mnist, f"MNIST-5k, ratio 0.9, {int(mnist.epochs.max())} epochs", "training length", "k-NN %",
                      "knn_top1", 100.0))
    return pd.DataFrame(rows, columns=COLUMNS)


def _num(x: float, pct: bool) -> str:
    return f"{x:.1f}" if pct else f"{x:.3f}"


def headline_markdown(rows: pd.DataFrame) -> str:
    """The README's table: one line per (rung, cIMLE variant), each with its LS on the same model; a rung's
    study and random init on its first line."""
    lines = ["| rung (seeds), study | measure | random init | least squares, same model | cIMLE | "
             "cIMLE - LS, paired 95% |", "|---|---|---|---|---|---|"]
    seen = set()
    for r in rows.itertuples():
        pct = r.measure.endswith("%")
        first = r.rung not in seen
        seen.add(r.rung)
        lines.append("| " + " | ".join([
            f"{r.rung} ({r.seeds}), {r.study}" if first else "", r.measure if first else "",
            _num(r.random, pct) if first else "",
            f"{r.ls_label}: {_num(r.ls, pct)} ± {_num(r.ls_sd, pct)}",
            f"{r.variant}: {_num(r.cimle, pct)} ± {_num(r.cimle_sd, pct)}",
            paired_cell(r.diff, r.low, r.high, 1 if pct else 3)]) + " |")
    return "\n".join(lines) + "\n"


def headline_figure(rows: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """One panel per rung: random init (dashed), LS and each cIMLE variant (mean ± sd over seeds), and above
    each cIMLE point its paired difference to LS with the 95% interval."""
    rungs = list(dict.fromkeys(rows.rung))
    # one column of the grid per point drawn, so that a rung with more variants gets the room they need
    widths = [rows[rows.rung == r].ls_label.nunique() + (rows.rung == r).sum() for r in rungs]
    fig, axes = subplots(1, len(rungs), figsize=(1.4 * sum(widths) + 1.0, 3.8), gridspec_kw={"width_ratios": widths})
    for ax, rung in zip(np.atleast_1d(axes), rungs):
        part = rows[rows.rung == rung]
        pct = part.measure.iloc[0].endswith("%")
        first = part.iloc[0]
        twins = part.drop_duplicates("ls_label")
        labels = [t.replace(" (", "\n(") for t in twins.ls_label] + ["cIMLE\n" + v.replace(", ", ",\n")
                                                                     for v in part.variant]
        means = list(twins.ls) + list(part.cimle)
        sds = list(twins.ls_sd) + list(part.cimle_sd)
        colours = [OBJECTIVE_PALETTE["least squares"]] * len(twins) + [OBJECTIVE_PALETTE["cIMLE"]] * len(part)
        x = np.arange(len(labels))
        ax.errorbar(x, means, yerr=sds, fmt="none", ecolor="black", capsize=3, linewidth=1)
        ax.scatter(x, means, c=colours, s=40, zorder=3)
        ax.axhline(first.random, color="grey", linestyle="--", linewidth=1, label="random init")
        for xi, r in zip(x[len(twins):], part.itertuples()):
            digits = 1 if pct else 2
            ax.annotate(f"{r.diff:+.{digits}f}\n[{r.low:+.{digits}f}, {r.high:+.{digits}f}]", (xi, r.cimle),
                        textcoords="offset points", xytext=(0, 10), ha="center", fontsize=7)
        top = 100.0 if pct else 1.0
        ax.set(xticks=x, xticklabels=labels, ylim=(0, top * 1.25), xlim=(-0.6, len(labels) - 0.4),
               title=f"{rung} ({first.seeds} seeds)", ylabel=first.measure)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("LS and cIMLE on the ladder: mean ± sd over seeds; above cIMLE, its paired "
                 "difference to LS [95% interval]", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, FIGURE_NAME, bbox_inches="tight")


def write_headline(results: str | Path, out_dir: str | Path) -> list[Path]:
    """The figure and its table (``headline.md``) in ``out_dir``."""
    rows = headline_rows(results)
    paths = headline_figure(rows, out_dir)
    table = Path(out_dir) / TABLE_NAME
    atomic_write_text(table, headline_markdown(rows))
    return [*paths, table]
