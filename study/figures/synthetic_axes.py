"""Where the completions of the same-mean synthetic images lie on their class axis.

A masked patch of a class-c image projects onto its class axis u_c at ``+-cue`` plus
noise and onto every other class's axis at noise alone
(:mod:`study.data.synthetic_images`). Least squares predicts the conditional mean, 0
on u_c; a sampler that knows the class puts its samples near ``+-cue``. One panel per
source, the true conditional's draws first, then each checkpoint's completions of the
same fixed images and masks; the pixel grids of these images are noise to the eye,
and these two numbers per patch are what tell the models apart.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
from torch import Tensor

from study.data.datasets import build_eval_datasets
from study.evaluation import samples as sampling
from study.evaluation.context_completion import synthetic_generator, true_completions
from study.figures.common import OBJECTIVE_LABELS, save_figure, subplots
from study.figures.samples import load_comparable
from study.utils.device import cpu_threads

__all__ = ["axis_projections", "class_axis_figure", "redraw", "main"]

TRUTH_COLOR = "#4d4d4d"
COLORS = {"ls": "#d95f02", "cimle": "#1b9e77", "mvae": "#7570b3"}
BINS = 60


def class_axes(generator) -> Tensor:
    """``[C, D]``: the class axes u_c in the models' patch layout (row, column, channel)."""
    u = generator.patterns  # [C, C_in, p, p]
    return u.permute(0, 2, 3, 1).reshape(u.shape[0], -1)


def axis_projections(generator, patches: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Projections of the masked patches of ``patches [k, B, N, D]`` (model layout) on the class axes:
    ``(own [k * masked], other [k * masked * (C - 1)])``, own = the image's class ``labels [B]``."""
    proj = patches.float() @ class_axes(generator).T  # [k, B, N, C]
    own_class = torch.nn.functional.one_hot(labels, generator.num_classes).bool()  # [B, C]
    own_class = own_class[None, :, None, :].expand_as(proj)
    masked = mask[None, :, :, None].expand_as(proj)
    return proj[masked & own_class], proj[masked & ~own_class]


def _label(cfg) -> str:
    if cfg.objective == "cimle":
        return f"cIMLE, {'per token' if cfg.cimle.select == 'token' else 'one z per image'}"
    return OBJECTIVE_LABELS.get(cfg.objective, cfg.objective)


def class_axis_figure(panels: Sequence[tuple[str, str, Tensor, Tensor]], cue: float, k: int, out_dir: str | Path,
                      name: str = "synthetic_class_axis") -> list[Path]:
    """``panels = [(title, color, own, other)]``, one panel each, on shared axes."""
    values = torch.cat([torch.cat([own, other]) for _, _, own, other in panels])
    # bin edges on a 0.1 grid: edges from the raw maximum would move with the last bits that differ
    # between CPU kernels, and with them every bar of the PDF
    lim = math.ceil(10 * max(1.6 * cue, float(values.abs().max()))) / 10
    bins = np.linspace(-lim, lim, BINS + 1)
    fig, axes = subplots(1, len(panels), figsize=(3.1 * len(panels), 2.9), sharex=True, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (title, color, own, other) in zip(axes, panels):
        near = float(((own.abs() - cue).abs() < cue / 2).float().mean())
        ax.hist(own.numpy(), bins=bins, density=True, color=color, alpha=0.75, label="own class's axis")
        ax.hist(other.numpy(), bins=bins, density=True, histtype="step", color="black", linewidth=0.9,
                label="other classes' axes")
        for x in (-cue, cue):
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{title}\n{100 * near:.0f}% within cue/2 of a mode", fontsize=8)
        ax.set_xlabel("projection of a masked patch", fontsize=8)
    axes[0].set_ylabel("density", fontsize=8)
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Masked patches on their class axis: true modes at +-cue = +-{cue:g} (dashed); "
                 f"{k} draws per image", fontsize=9)
    fig.set_layout_engine("constrained")
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        return save_figure(fig, out_dir, name)


def redraw(checkpoints: Sequence[str | Path], out_dir: str | Path = "figures", *, seed: int = sampling.SEED,
           name: str = "synthetic_class_axis") -> list[Path]:
    """The figure for ``checkpoints`` (synthetic-data runs), all on the first one's images and masks."""
    loaded = load_comparable(checkpoints)
    cfg0 = loaded[0][0]
    dataset = build_eval_datasets(cfg0)[1]  # the validation split: the batch's images and their truth
    generator = synthetic_generator(cfg0, dataset)
    batch = sampling.fixed_batch(cfg0, sampling.DIVERSITY_IMAGES, seed, dataset)
    k = sampling.num_samples(cfg0)
    truth = true_completions(generator, dataset, batch, k, seed)
    panels = [("true conditional", TRUTH_COLOR, *axis_projections(generator, truth, batch.labels, batch.mask))]
    for cfg, _, models in loaded:
        patches = sampling.model_samples(models["pretrained"], batch, k, seed)
        panels.append((_label(cfg), COLORS.get(cfg.objective, "C0"),
                       *axis_projections(generator, patches, batch.labels, batch.mask)))
    return class_axis_figure(panels, generator.cue, k, out_dir, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="synthetic-data checkpoints")
    parser.add_argument("--out", default="runs/figures", help="figure folder (default runs/figures)")
    args = parser.parse_args(argv)
    with cpu_threads(1):  # one reduction order: byte-identical figures
        for p in redraw(args.checkpoints, args.out):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
