"""Example masks of every kind (rows) at several ratios (columns), titled with their clustering score.

    python -m study.figures.masks --out figures/

writes ``masks.png`` and ``masks.pdf``; reruns give byte-identical files
(fixed seed, no dates in the metadata, atomic writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from study.figures.common import save_figure
from study.data.masking import MaskGenerator, clustering_score

__all__ = ["ROWS", "plot_mask_examples", "main"]

# (label, kind, filter)
ROWS = (
    ("random", "random", "green"),
    ("block", "block", "green"),
    ("noise red", "noise", "red"),
    ("noise green", "noise", "green"),
    ("noise blue", "noise", "blue"),
    ("noise white", "noise", "white"),
)
SCORE_BATCH = 256  # masks averaged for the clustering score in each title


def plot_mask_examples(
    out_dir: str | Path,
    grid: tuple[int, int] = (14, 14),
    ratios: Sequence[float] = (0.5, 0.75, 0.9),
    seed: int = 0,
) -> list[Path]:
    """Draw one example mask per (kind/filter, ratio); save ``masks.png`` and ``masks.pdf`` in ``out_dir``.

    Each panel's title gives the clustering score (1 = random, > 1 clustered,
    < 1 dispersed; :func:`study.data.masking.clustering_score`) averaged over
    ``SCORE_BATCH`` masks drawn with the same seed. Masked patches are dark.
    Returns the two paths.
    """
    import matplotlib

    from matplotlib.figure import Figure

    gh, gw = grid
    ratios = tuple(float(r) for r in ratios)
    if not ratios:
        raise ValueError("ratios must name at least one ratio")
    out = Path(out_dir)
    with matplotlib.rc_context({"svg.hashsalt": "masks", "pdf.fonttype": 42}):
        fig = Figure(figsize=(1.9 * len(ratios) + 0.9, 1.9 * len(ROWS) * gh / max(gw, 1) * 0.9 + 0.6),
                     layout="constrained")
        axes = fig.subplots(len(ROWS), len(ratios), squeeze=False)
        for i, (label, kind, filt) in enumerate(ROWS):
            for j, ratio in enumerate(ratios):
                gen = MaskGenerator(kind, ratio, grid, filter=filt)
                masks = gen(SCORE_BATCH, generator=torch.Generator().manual_seed(seed * 1000 + 100 * i + j))
                score = clustering_score(masks, grid)
                ax = axes[i, j]
                ax.imshow(masks[0].reshape(gh, gw).numpy(), cmap="Greys", vmin=0, vmax=1.6,
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"score {score:.2f}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(label, fontsize=9)
                if i == 0:
                    ax.text(0.5, 1.22, f"ratio {ratio:g}", transform=ax.transAxes, ha="center",
                            fontsize=9, fontweight="bold")
        fig.suptitle(f"Masks on a {gh}x{gw} patch grid (dark = masked)", fontsize=10)
        paths = save_figure(fig, out, "masks")
    return paths


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m study.figures.masks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures", help="output folder (default: figures)")
    parser.add_argument("--grid", type=int, nargs=2, default=(14, 14), metavar=("GH", "GW"))
    parser.add_argument("--ratios", type=float, nargs="+", default=(0.5, 0.75, 0.9))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = plot_mask_examples(args.out, grid=tuple(args.grid), ratios=args.ratios, seed=args.seed)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
