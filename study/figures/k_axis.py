"""The k axis: how many samples cIMLE draws, on MNIST-5k and the same-mean synthetic images.

From the committed tables of ``make k-axis``:

* ``results/k_axis_cpu.csv`` (MNIST, ratio 0.9, 30 epochs, 5 seeds): k-NN, mean pooling;
* ``results/k_axis_synthetic_cpu.csv`` (default point, 3 seeds): linear probe, mean pooling;
* ``results/k_axis_latent_swap.csv``: the latent-swap diagnostic of every run
  (:mod:`study.evaluation.latent_swap`).

Each cIMLE variant is paired (same seed) with least squares on its own
decoder: the LS run whose noise block (``head``: the token-wise head at
z = 0; else the plain decoder) is the variant's. :func:`k_axis_rows` gives,
per data set, variant and k, the probe's mean and the paired difference
cIMLE - LS with its 95% t-interval; :func:`swap_rows` the same for the swap
gain; :func:`k_axis_figure` draws both against k.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from study.figures.common import paired_cell, save_figure, subplots
from study.io import atomic_write_text
from study.results import read_results
from study.statistics import t_interval

__all__ = ["k_axis_rows", "swap_rows", "k_axis_figure", "k_axis_markdown", "write_k_axis", "DATASETS"]

# data set -> (table, metric, scale, measure label)
DATASETS = {
    "MNIST-5k, ratio 0.9": ("k_axis_cpu.csv", "knn_top1", 100.0, "k-NN %"),
    "synthetic images": ("k_axis_synthetic_cpu.csv", "linear_top1", 1.0, "linear probe"),
}
SWAP_TABLE = "k_axis_latent_swap.csv"
VARIANTS = {"token": "per token", "image": "per image"}
COLORS = {"per token": "#1b9e77", "per image": "#66a61e", "LS": "#d95f02"}


def _variant_rows(table: pd.DataFrame, select: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cIMLE rows of ``select``, the LS rows on the same decoder)."""
    table = table.assign(noise_block=table.noise_block.astype(str))
    cimle = table[(table.objective == "cimle") & (table.cimle_select == select)]
    blocks = set(cimle.noise_block)
    if not blocks:  # a sweep still running: the variant has no rows yet
        return cimle, cimle
    if len(blocks) != 1:
        raise ValueError(f"cIMLE {select} runs on {len(blocks)} decoders ({sorted(blocks)}); expected one")
    ls = table[(table.objective == "ls") & (table.noise_block == blocks.pop())]
    return cimle, ls


def _paired_by_k(cimle: pd.DataFrame, ls: pd.DataFrame, scale: float) -> list[dict]:
    base = ls.groupby("seed").value.first()
    rows = []
    if not len(base):
        return rows
    for k, group in cimle.groupby("k"):
        own = group.groupby("seed").value.first()
        seeds = own.index.intersection(base.index)
        diff, low, high = t_interval((own[seeds] - base[seeds]).to_numpy() * scale)
        rows.append({"k": int(k), "seeds": len(seeds), "cimle": own.mean() * scale, "cimle_sd": own.std() * scale,
                     "ls": base[seeds].mean() * scale, "ls_sd": base[seeds].std() * scale, "diff": diff,
                     "low": low, "high": high})
    return rows


def k_axis_rows(results: str | Path) -> pd.DataFrame:
    """Per data set, variant and k: probe means and the paired difference to LS (``random``: random init)."""
    out = []
    for name, (file, metric, scale, measure) in DATASETS.items():
        table = read_results(Path(results) / file)
        table = table[(table.metric == metric) & (table.pool == "mean")]
        random = table[table.encoder == "random"].groupby("seed").value.first().mean() * scale
        pretrained = table[table.encoder == "pretrained"]
        for select, label in VARIANTS.items():
            cimle, ls = _variant_rows(pretrained, select)
            out += [{"data": name, "measure": measure, "variant": label, "random": random, **r}
                    for r in _paired_by_k(cimle, ls, scale)]
    return pd.DataFrame(out)


def swap_rows(results: str | Path) -> pd.DataFrame:
    """Per data set, variant and k: the mean swap gain (in %) of cIMLE and of its LS, and their paired difference."""
    table = read_results(Path(results) / SWAP_TABLE)
    table = table[table.metric == "swap_gain"]
    names = {"mnist": "MNIST-5k, ratio 0.9", "synthetic": "synthetic images"}
    out = []
    for dataset, group in table.groupby("dataset"):
        for select, label in VARIANTS.items():
            cimle, ls = _variant_rows(group, select)
            out += [{"data": names.get(dataset, dataset), "variant": label, **r}
                    for r in _paired_by_k(cimle, ls, 100.0)]
    return pd.DataFrame(out)


def k_axis_markdown(probe: pd.DataFrame, swap: pd.DataFrame) -> str:
    """One row per (data set, variant, k): probe, paired difference, swap gains."""
    swap = swap.set_index(["data", "variant", "k"])
    lines = ["| data (seeds) | cIMLE | k | probe: cIMLE | LS | cIMLE - LS, paired 95% | swap gain %: cIMLE | LS |"
             " cIMLE - LS, paired 95% |", "|---|---|---|---|---|---|---|---|---|"]
    for r in probe.itertuples():
        digits = 1 if r.measure.endswith("%") else 3
        s = swap.loc[(r.data, r.variant, r.k)] if (r.data, r.variant, r.k) in swap.index else None
        sw = ("| - | - | - |" if s is None else
              f"| {s.cimle:.1f} | {s.ls:.1f} | {paired_cell(s['diff'], s.low, s.high, 1, bold=False)} |")
        lines.append(f"| {r.data} ({r.seeds}) | {r.variant} | {r.k} | {r.cimle:.{digits}f} ± {r.cimle_sd:.{digits}f} "
                     f"| {r.ls:.{digits}f} | {paired_cell(r.diff, r.low, r.high, digits)} {sw}")
    return "\n".join(lines) + "\n"


def k_axis_figure(probe: pd.DataFrame, swap: pd.DataFrame, out_dir: str | Path, name: str = "k_axis") -> list[Path]:
    """Top: the probe against k per data set (LS and random init as lines); bottom: the swap gain."""
    datasets = list(dict.fromkeys(probe.data))
    fig, axes = subplots(2, len(datasets), figsize=(5.2 * len(datasets), 6.4), squeeze=False)
    for j, data in enumerate(datasets):
        for row, frame, ylabel in ((0, probe, None), (1, swap, "swap gain % (other image's latent)")):
            ax = axes[row, j]
            part = frame[frame.data == data]
            if not len(part):
                ax.set_visible(False)
                continue
            for variant, group in part.groupby("variant", sort=False):
                group = group.sort_values("k")
                offset = 1.04 if variant == "per image" else 1 / 1.04  # keep the two variants' bars apart
                ax.errorbar(group.k * offset, group.cimle, yerr=group.cimle_sd, marker="o", capsize=3,
                            color=COLORS[variant], label=f"cIMLE {variant}")
                ls = group.ls.iloc[0]
                style = "-" if variant == "per token" else ":"
                ax.axhline(ls, color=COLORS["LS"], linestyle=style, linewidth=1.2,
                           label=f"LS ({'head at z = 0' if variant == 'per token' else 'plain decoder'})"
                           if data.startswith("MNIST") else ("LS" if variant == "per token" else None))
            if row == 0:
                ax.axhline(part.random.iloc[0], color="grey", linestyle="--", linewidth=1, label="random init")
                ax.set_title(f"{data} ({int(part.seeds.max())} seeds)", fontsize=9)
                ax.set_ylabel(part.measure.iloc[0])
            else:
                ax.set_ylabel(ylabel)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(part.k)), [str(k) for k in sorted(set(part.k))])
            ax.set_xlabel("k (samples per step)")
            ax.legend(fontsize=7)
    fig.suptitle("cIMLE against its k: mean ± sd over seeds; LS on the same decoder as lines", fontsize=10)
    fig.set_layout_engine("constrained")
    return save_figure(fig, out_dir, name)


def write_k_axis(results: str | Path, out: str | Path) -> list[Path]:
    """``out/k_axis.{png,pdf}`` and the table ``out/k_axis.md``, from the committed tables."""
    probe, swap = k_axis_rows(results), swap_rows(results)
    paths = k_axis_figure(probe, swap, out)
    table = Path(out) / "k_axis.md"
    atomic_write_text(table, k_axis_markdown(probe, swap))
    return paths + [table]
