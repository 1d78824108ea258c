"""The k axis: how many samples cIMLE draws, on MNIST-5k and the same-mean synthetic images.

Reads the committed tables of ``make k-axis`` (MNIST at ratio 0.9 by k-NN, the
synthetic images at the default point by linear probe, both mean-pooled, and the
latent-swap diagnostic of every run: :mod:`study.evaluation.latent_swap`). Each cIMLE
variant is paired (same seed) with least squares on its own decoder, the LS run whose
noise block is the variant's, so a difference measures the objective and not the
decoder. :func:`k_axis_rows` gives per data set, variant and k the probe's mean and
the paired difference with its 95% t-interval and Holm-adjusted p-value (the family:
every cell of the data set); :func:`k_trends` one slope per doubling of k;
:func:`swap_rows` the paired swap gain; :func:`k_axis_figure` draws both against k.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from study.figures.common import paired_cell, save_figure, subplots
from study.utils.io import atomic_write_text
from study.evaluation.results import read_results
from study.evaluation.statistics import decoders, equivalence, holm, paired_p_value, t_interval, trend_per_doubling

__all__ = ["k_axis_rows", "swap_rows", "k_axis_figure", "k_axis_markdown", "write_k_axis", "DATASETS"]

# data set -> (table, metric, scale, measure label)
# the equivalence bound of "level", in the probe's units (docs/expectations.md)
LEVEL_BOUND = {"k-NN %": 2.0, "linear probe": 0.02}
DATASETS = {
    "MNIST-5k, ratio 0.9": ("k_axis_cpu.csv", "knn_top1", 100.0, "k-NN %"),
    "synthetic images": ("k_axis_synthetic_cpu.csv", "linear_top1", 1.0, "linear probe"),
}
SWAP_TABLE = "k_axis_latent_swap.csv"
# (selection, where the noise enters) -> label; each is paired with LS on that decoder
VARIANTS = {("token", "head"): "per token", ("image", "0"): "per image", ("image", "head"): "per image, head"}
COLORS = {"per token": "#1b9e77", "per image": "#66a61e", "per image, head": "#1f78b4", "LS": "#d95f02"}
OFFSETS = {"per token": 1 / 1.05, "per image": 1.0, "per image, head": 1.05}  # keep the variants' bars apart


def _variant_rows(table: pd.DataFrame, select: str, block: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cIMLE rows of ``select`` with the noise at ``block``, the LS rows on the same decoder)."""
    table = table.assign(noise_block=table.noise_block.astype(str))
    cimle = table[(table.objective == "cimle") & (table.cimle_select == select) & (table.noise_block == block)]
    decoder = "head" if block == "head" else "plain"  # z = 0 at a block adds exactly 0: MAE's decoder
    return cimle, table[(table.objective == "ls") & (decoders(table) == decoder)]


def _paired_by_k(cimle: pd.DataFrame, ls: pd.DataFrame, scale: float) -> list[dict]:
    base = ls.groupby("seed").value.first()
    rows = []
    if not len(base):
        return rows
    for k, group in cimle.groupby("k"):
        own = group.groupby("seed").value.first()
        seeds = own.index.intersection(base.index)
        per_seed = (own[seeds] - base[seeds]).to_numpy() * scale
        diff, low, high = t_interval(per_seed)
        rows.append({"k": int(k), "seeds": len(seeds), "cimle": own.mean() * scale, "cimle_sd": own.std() * scale,
                     "ls": base[seeds].mean() * scale, "ls_sd": base[seeds].std() * scale, "diff": diff,
                     "low": low, "high": high, "p": paired_p_value(per_seed),
                     "per_seed": dict(zip(seeds, per_seed))})
    return rows


def k_axis_rows(results: str | Path) -> pd.DataFrame:
    """Per data set, variant and k: probe means and the paired difference to LS (``random``: random init)."""
    out = []
    for name, (file, metric, scale, measure) in DATASETS.items():
        table = read_results(Path(results) / file)
        table = table[(table.metric == metric) & (table.pool == "mean")]
        random = table[table.encoder == "random"].groupby("seed").value.first().mean() * scale
        pretrained = table[table.encoder == "pretrained"]
        rows = [{"data": name, "measure": measure, "variant": label, "random": random, **r}
                for (select, block), label in VARIANTS.items()
                for r in _paired_by_k(*_variant_rows(pretrained, select, block), scale)]
        for r, p in zip(rows, holm([r["p"] for r in rows])):
            r["p_holm"] = p
        out += rows
    return pd.DataFrame(out)


def k_trends(probe: pd.DataFrame) -> pd.DataFrame:
    """Per data set and variant with three k or more: the slope of cIMLE - LS per doubling of k (one
    least-squares slope per seed, their 95% t-interval): the family's one test of a trend over k."""
    out = []
    for (data, variant), group in probe.groupby(["data", "variant"], sort=False):
        if group.k.nunique() < 3:
            continue
        by_seed = pd.DataFrame(list(group.per_seed), index=group.k).T.dropna()
        out.append({"data": data, "variant": variant, "ks": len(group), **trend_per_doubling(group.k, by_seed)})
    return pd.DataFrame(out)


def swap_rows(results: str | Path) -> pd.DataFrame:
    """Per data set, variant and k: the mean swap gain (in %) of cIMLE and of its LS, and their paired difference."""
    table = read_results(Path(results) / SWAP_TABLE)
    table = table[table.metric == "swap_gain"]
    names = {"mnist": "MNIST-5k, ratio 0.9", "synthetic": "synthetic images"}
    out = []
    for dataset, group in table.groupby("dataset"):
        for (select, block), label in VARIANTS.items():
            out += [{"data": names.get(dataset, dataset), "variant": label, **r}
                    for r in _paired_by_k(*_variant_rows(group, select, block), 100.0)]
    return pd.DataFrame(out)


def k_axis_markdown(probe: pd.DataFrame, swap: pd.DataFrame) -> str:
    """One row per (data set, variant, k): probe, paired difference (bold: Holm-adjusted p < 0.05 in the
    data set's family), swap gains; then the slope per doubling of k of each variant."""
    swap = swap.set_index(["data", "variant", "k"])
    lines = ["| data (seeds) | cIMLE | k | probe: cIMLE | LS | cIMLE - LS, paired 95% | Holm p | swap gain %: cIMLE "
             "| LS | cIMLE - LS, paired 95% |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in probe.itertuples():
        digits = 1 if r.measure.endswith("%") else 3
        s = swap.loc[(r.data, r.variant, r.k)] if (r.data, r.variant, r.k) in swap.index else None
        sw = ("| - | - | - |" if s is None else
              f"| {s.cimle:.1f} | {s.ls:.1f} | {paired_cell(s['diff'], s.low, s.high, 1, bold=False)} |")
        cell = paired_cell(r.diff, r.low, r.high, digits, bold=bool(r.p_holm < 0.05))
        lines.append(f"| {r.data} ({r.seeds}) | {r.variant} | {r.k} | {r.cimle:.{digits}f} ± {r.cimle_sd:.{digits}f} "
                     f"| {r.ls:.{digits}f} | {cell} | {r.p_holm:.3f} {sw}")
    lines += ["", "| data | cIMLE | k values | slope of cIMLE - LS per doubling of k, 95% |", "|---|---|---|---|"]
    for t in k_trends(probe).itertuples():
        lines.append(f"| {t.data} | {t.variant} | {t.ks} | {paired_cell(t.slope, t.low, t.high, 2)} |")
    lines += ["", "At k = 1 there is no selection: a fair noise placement is level with its LS. Two one-sided tests:",
              "", "| data | cIMLE at k = 1 | cIMLE - LS, 90% | bound | level? |", "|---|---|---|---|---|"]
    for r in probe[probe.k == 1].itertuples():
        digits = 1 if r.measure.endswith("%") else 3
        eq = equivalence(list(r.per_seed.values()), LEVEL_BOUND[r.measure])
        lines.append(f"| {r.data} | {r.variant} | {paired_cell(eq['mean'], eq['low'], eq['high'], digits, bold=False)} "
                     f"| ±{eq['bound']:g} | {eq['verdict']} |")
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
                ax.errorbar(group.k * OFFSETS[variant], group.cimle, yerr=group.cimle_sd, marker="o", capsize=3,
                            color=COLORS[variant], label=f"cIMLE {variant}")
                if variant == "per image, head":
                    continue  # its LS is the per-token variant's: the head at z = 0
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
