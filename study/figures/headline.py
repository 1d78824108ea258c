"""The ladder side by side: the toy, the same-mean synthetic images and MNIST, LS against cIMLE.

One row per (rung, cIMLE variant), from the committed tables only:

* toy (``results/toy/toy_results.csv``): the class probe of h(x) at s = 1,
  where the class is only in the modes; random init is the same encoder
  untrained;
* synthetic images (``results/synthetic_cpu.csv``): the linear probe at the
  default point (mean shift 0, ratio 0.75, distractor 0.75), mean pooling;
* MNIST-5k (``results/efficiency_cpu.csv``): k-NN at ratio 0.9 after 60
  epochs, mean pooling.

Every cIMLE number comes with its paired difference to LS (same seed: same
initial weights, data order and masks) and the difference's 95% t-interval
(:mod:`study.statistics`). :func:`headline_figure` draws them; the README's
results table is :func:`headline_markdown` of the same rows, which
``make figures`` writes beside the figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from study.figures.common import OBJECTIVE_PALETTE, paired_cell, save_figure, subplots
from study.figures.synthetic import axis_slice
from study.io import atomic_write_text
from study.results import read_results
from study.statistics import paired_differences, t_interval

__all__ = ["headline_rows", "headline_markdown", "headline_figure", "write_headline", "FIGURE_NAME", "TABLE_NAME"]

FIGURE_NAME = "headline"
TABLE_NAME = "headline.md"
COLUMNS = ["rung", "measure", "seeds", "random", "ls", "ls_sd", "variant", "cimle", "cimle_sd", "diff", "low",
           "high"]


def _toy(results: Path) -> list[dict]:
    t = read_results(results / "toy" / "toy_results.csv")
    t = t[(t.mask_strength == 1.0)]
    probe = t[t.metric == "probe_accuracy"].pivot_table(index="seed", columns="objective", values="value")
    random = t[(t.metric == "probe_accuracy_untrained") & (t.objective == "ls")].value.mean()
    diff, low, high = t_interval((probe["cimle"] - probe["ls"]).to_numpy())
    return [{"rung": "toy, s = 1", "measure": "class probe", "seeds": len(probe), "random": random,
             "ls": probe["ls"].mean(), "ls_sd": probe["ls"].std(), "variant": "one z per example",
             "cimle": probe["cimle"].mean(), "cimle_sd": probe["cimle"].std(), "diff": diff, "low": low,
             "high": high}]


def _paired(table: pd.DataFrame, rung: str, measure: str, metric: str, scale: float) -> list[dict]:
    """The rows of a sweep table already cut to one setting: LS, random init and each cIMLE variant."""
    table = table[(table.pool == "mean") & (table.metric == metric)]
    pretrained = table[table.encoder == "pretrained"]
    ls = pretrained[pretrained.objective == "ls"].value * scale
    random = table[table.encoder == "random"].groupby("seed").value.first().mean() * scale
    pairs = paired_differences(table, metrics=(metric,))
    rows = []
    for variant, label in (("cimle-token", "per token"), ("cimle", "per image")):
        p = pairs[pairs.objective == variant]
        if len(p) != 1:
            raise ValueError(f"{rung}: expected one {variant} setting to pair with LS, found {len(p)}")
        p = p.iloc[0]
        own = pretrained[(pretrained.objective == "cimle")
                         & (pretrained.cimle_select == ("token" if variant == "cimle-token" else "image"))]
        rows.append({"rung": rung, "measure": measure, "seeds": int(p.n), "random": random, "ls": ls.mean(),
                     "ls_sd": ls.std(), "variant": label, "cimle": own.value.mean() * scale,
                     "cimle_sd": own.value.std() * scale, "diff": p.mean_diff * scale, "low": p.ci_low * scale,
                     "high": p.ci_high * scale})
    return rows


def headline_rows(results: str | Path) -> pd.DataFrame:
    results = Path(results)
    synthetic = axis_slice(read_results(results / "synthetic_cpu.csv"), axis="")  # the default point
    mnist = read_results(results / "efficiency_cpu.csv")
    mnist = mnist[mnist.epochs == mnist.epochs.max()]
    rows = (_toy(results)
            + _paired(synthetic, "same-mean synthetic images", "linear probe", "linear_top1", 1.0)
            + _paired(mnist, f"MNIST-5k, ratio 0.9, {int(mnist.epochs.max())} epochs", "k-NN %", "knn_top1", 100.0))
    return pd.DataFrame(rows, columns=COLUMNS)


def _num(x: float, pct: bool) -> str:
    return f"{x:.1f}" if pct else f"{x:.3f}"


def headline_markdown(rows: pd.DataFrame) -> str:
    """The README's table: one line per (rung, cIMLE variant); a rung's LS and random init on its first line."""
    lines = ["| rung (seeds) | measure | random init | least squares | cIMLE | cIMLE - LS, paired 95% |",
             "|---|---|---|---|---|---|"]
    seen = set()
    for r in rows.itertuples():
        pct = r.measure.endswith("%")
        first = r.rung not in seen
        seen.add(r.rung)
        lines.append("| " + " | ".join([
            f"{r.rung} ({r.seeds})" if first else "", r.measure if first else "",
            _num(r.random, pct) if first else "",
            f"{_num(r.ls, pct)} ± {_num(r.ls_sd, pct)}" if first else "",
            f"{r.variant}: {_num(r.cimle, pct)} ± {_num(r.cimle_sd, pct)}",
            paired_cell(r.diff, r.low, r.high, 1 if pct else 3)]) + " |")
    return "\n".join(lines) + "\n"


def headline_figure(rows: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """One panel per rung: random init (dashed), LS and each cIMLE variant (mean ± sd over seeds), and above
    each cIMLE point its paired difference to LS with the 95% interval."""
    rungs = list(dict.fromkeys(rows.rung))
    fig, axes = subplots(1, len(rungs), figsize=(3.6 * len(rungs), 3.4))
    for ax, rung in zip(np.atleast_1d(axes), rungs):
        part = rows[rows.rung == rung]
        pct = part.measure.iloc[0].endswith("%")
        first = part.iloc[0]
        labels = ["least squares"] + [f"cIMLE\n{v}" for v in part.variant]
        means = [first.ls] + list(part.cimle)
        sds = [first.ls_sd] + list(part.cimle_sd)
        colours = [OBJECTIVE_PALETTE["least squares"]] + [OBJECTIVE_PALETTE["cIMLE"]] * len(part)
        x = np.arange(len(labels))
        ax.errorbar(x, means, yerr=sds, fmt="none", ecolor="black", capsize=3, linewidth=1)
        ax.scatter(x, means, c=colours, s=40, zorder=3)
        ax.axhline(first.random, color="grey", linestyle="--", linewidth=1, label="random init")
        for xi, r in zip(x[1:], part.itertuples()):
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
