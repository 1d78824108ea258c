"""Completions of masked images: one figure per checkpoint and one LS / cIMLE / Masked VAE comparison.

    python -m study.figures.samples --checkpoints results/checkpoints/synthetic_hidden_ls.pt \\
        results/checkpoints/synthetic_hidden_cimle_token.pt --out runs/figures

writes ``samples_<objective>.{png,pdf}`` for every checkpoint and
``samples_comparison.{png,pdf}`` (rows = images; columns original | masked |
each checkpoint's outputs: one for least squares, ``k`` samples for cIMLE and
the Masked VAE). Masked patches of an output are the model's, visible ones are
pasted from the input. Images, masks and sample noise come from fixed seeds
(:mod:`study.evaluation.samples`), torch runs on one thread, and
:func:`study.figures.common.save_figure` writes no dates, so reruns are
byte-identical. The per-checkpoint figures are the ones ``python -m study
evaluate --protocols samples`` draws.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from torch import Tensor

from study.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from study.evaluation import samples as sampling
from study.evaluation.setup import load_models
from study.figures.common import OBJECTIVE_LABELS, save_figure
from study.utils.device import cpu_threads

__all__ = ["plot_samples", "draw_samples", "plot_comparison", "completion_mismatches", "load_comparable", "redraw", "main"]

MASK_COLOR = (0.80, 0.86, 0.93)  # masked patches in the "masked" column
OUTLINE_COLOR = "#2b8cbe"  # edge of the masked region on the output panels
PANEL_INCHES = 0.85
SHORT_LABELS = {"ls": "LS", "cimle": "cIMLE", "mvae": "MVAE"}


# --------------------------------------------------------------------------- drawing


def _display_range(originals: Tensor):
    """Per-row pixel range for grayscale display: [min, max] of the original image."""
    flat = originals.flatten(1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def _to_rgb(img: Tensor, lo: float, hi: float, norm: tuple | None) -> np.ndarray:
    """``[C, H, W]`` model input -> ``[H, W, 3]`` in [0, 1]."""
    img = img.float()
    if img.shape[0] == 3:
        if norm is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in norm)
            img = img * std + mean
        out = img.clamp(0, 1)
    else:
        g = ((img[0] - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        out = g[None].expand(3, *g.shape)
    return out.permute(1, 2, 0).numpy()


def _paint_masked(rgb: np.ndarray, mask: Tensor, patch_size: int) -> np.ndarray:
    out = rgb.copy()
    gw = rgb.shape[1] // patch_size
    for n in torch.nonzero(mask).flatten().tolist():
        r, c = divmod(n, gw)
        out[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = MASK_COLOR
    return out


def _outline_masked(ax, mask: Tensor, grid: tuple[int, int], patch_size: int) -> None:
    """Outline the masked region on a panel: patch edges between masked and visible (or the border)."""
    gh, gw = grid
    m = mask.reshape(gh, gw).tolist()
    segs = []
    for r in range(gh):
        for c in range(gw):
            if not m[r][c]:
                continue
            x0, y0 = c * patch_size - 0.5, r * patch_size - 0.5
            x1, y1 = x0 + patch_size, y0 + patch_size
            if r == 0 or not m[r - 1][c]:
                segs.append([(x0, y0), (x1, y0)])
            if r == gh - 1 or not m[r + 1][c]:
                segs.append([(x0, y1), (x1, y1)])
            if c == 0 or not m[r][c - 1]:
                segs.append([(x0, y0), (x0, y1)])
            if c == gw - 1 or not m[r][c + 1]:
                segs.append([(x1, y0), (x1, y1)])
    ax.add_collection(LineCollection(segs, colors=OUTLINE_COLOR, linewidths=0.7))


def _grid_figure(images: Tensor, mask: Tensor, labels: Tensor, columns: list[tuple[str, Tensor]],
                 patch_size: int, title: str, norm: tuple | None = None):
    """Rows = images; columns original | masked | ``columns`` (``(header, [B, C, H, W])``)."""
    b = images.shape[0]
    lo, hi = _display_range(images)
    headers = ["original", "masked"] + [h for h, _ in columns]
    ncol = len(headers)
    width = PANEL_INCHES * ncol + 0.4
    fig = Figure(figsize=(width, PANEL_INCHES * b + 0.7), layout="constrained")
    axes = fig.subplots(b, ncol, squeeze=False)
    for i in range(b):
        orig = _to_rgb(images[i], float(lo[i]), float(hi[i]), norm)
        panels = [orig, _paint_masked(orig, mask[i], patch_size)]
        panels += [_to_rgb(col[i], float(lo[i]), float(hi[i]), norm) for _, col in columns]
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, interpolation="nearest")
            if j >= 2:
                _outline_masked(ax, mask[i], (images.shape[-2] // patch_size, images.shape[-1] // patch_size),
                                patch_size)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(headers[j], fontsize=7)
        axes[i, 0].set_ylabel(f"class {int(labels[i])}", fontsize=7)
    # constrained layout does not shrink a suptitle wider than the figure: wrap it (~13 chars per inch at 9 pt)
    fig.suptitle(textwrap.fill(title, width=max(40, int(13 * width))), fontsize=9)
    return fig


def _norm(in_chans: int):
    """The RGB folder datasets' eval normalisation, to undo for display (grey images are shown by range)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else None


def _output_columns(objective: str, patches: Tensor, model, label: str | None = None) -> list[tuple[str, Tensor]]:
    """One column for least squares (its outputs are all the same), else one per sample."""
    imgs = model.completed_images(patches)  # [k, B, C, H, W]
    name = label or SHORT_LABELS.get(objective, objective)
    if objective == "ls":
        return [(f"{name} recon", imgs[0])]
    return [(f"{name} {s + 1}", imgs[s]) for s in range(imgs.shape[0])]


def plot_samples(model, batch, patches: Tensor, out_dir: str | Path, name: str) -> list[Path]:
    """One checkpoint's figure: ``batch`` (a :class:`study.evaluation.samples.SampleBatch`) and its
    completions ``patches [k, B, N, p*p*C]``; saved as ``out_dir/name.{png,pdf}``."""
    objective = model.objective
    cols = _output_columns(objective, patches, model)
    k = patches.shape[0]
    what = "reconstruction" if objective == "ls" else f"{k} samples" + (" from the prior" if objective == "mvae"
                                                                       else "")
    title = (f"{OBJECTIVE_LABELS.get(objective, objective)}: {what} "
             "- masked patches (blue edges) from the model, the rest pasted from the input")
    with matplotlib.rc_context({"svg.hashsalt": name, "pdf.fonttype": 42}):
        fig = _grid_figure(batch.images, batch.mask, batch.labels, cols, model.patch_size, title,
                           _norm(model.in_chans))
        return save_figure(fig, out_dir, name)


def draw_samples(drawing: sampling.SamplesDrawing, out_dir: str | Path) -> list[Path]:
    """The ``samples`` protocol's figure of one model (what ``python -m study evaluate`` draws)."""
    return plot_samples(drawing.model, drawing.batch, drawing.patches, out_dir, drawing.name)


def plot_comparison(entries: Sequence[tuple[str, object, Tensor]], batch, out_dir: str | Path,
                    name: str = "samples_comparison", title: str | None = None) -> list[Path]:
    """Several checkpoints on the same images and masks: ``entries = [(label, model, patches)]``;
    ``title`` replaces the one naming each entry's output count."""
    if not entries:
        raise ValueError("plot_comparison needs at least one checkpoint")
    cols: list[tuple[str, Tensor]] = []
    for label, model, patches in entries:
        cols += _output_columns(model.objective, patches, model, label)
    model0 = entries[0][1]
    if title is None:
        title = ("Completions of the same masked images: "
                 + ", ".join(f"{label or SHORT_LABELS.get(m.objective, m.objective)} "
                             f"({'1 output' if m.objective == 'ls' else f'{p.shape[0]} samples'})"
                             for label, m, p in entries)
                 + " - masked patches (blue edges) from the model, the rest pasted from the input")
    with matplotlib.rc_context({"svg.hashsalt": name, "pdf.fonttype": 42}):
        fig = _grid_figure(batch.images, batch.mask, batch.labels, cols, model0.patch_size, title,
                           _norm(model0.in_chans))
        return save_figure(fig, out_dir, name)


# --------------------------------------------------------------------------- from checkpoints


def completion_mismatches(cfg_a, cfg_b) -> list[str]:
    """Fields that must agree for two checkpoints to complete the same images and masks."""
    diffs = []
    da, db = dataclasses.asdict(cfg_a.data), dataclasses.asdict(cfg_b.data)
    for key in ("name", "root", "val_fraction", "synthetic"):
        if da[key] != db[key]:
            diffs.append(f"data.{key}: {da[key]!r} vs {db[key]!r}")
    for key in ("img_size", "patch_size", "in_chans"):
        a, b = getattr(cfg_a.model, key), getattr(cfg_b.model, key)
        if a != b:
            diffs.append(f"model.{key}: {a!r} vs {b!r}")
    return diffs


def load_comparable(checkpoints: Sequence[str | Path]) -> list:
    """``load_models`` of every checkpoint; ValueError unless all complete the first one's images."""
    if not checkpoints:
        raise ValueError("no checkpoint given")
    loaded = [load_models(c) for c in checkpoints]
    cfg0 = loaded[0][0]
    for path, (cfg, _, _) in zip(checkpoints[1:], loaded[1:]):
        diffs = completion_mismatches(cfg0, cfg)
        if diffs:
            raise ValueError(f"{path} does not complete the same images as {checkpoints[0]}: " + "; ".join(diffs))
    return loaded


def redraw(checkpoints: Sequence[str | Path], out_dir: str | Path = "figures", *, comparison: bool = True,
           seed: int | None = None, n_shown: int | None = None, max_samples: int | None = None,
           device: str = "cpu", prefix: str = "samples") -> list[Path]:
    """Per-checkpoint figures ``<prefix>_<objective>`` and (``comparison``, two or more checkpoints)
    ``<prefix>_comparison``.

    Every checkpoint completes the images and masks of the first one's config
    (the masks follow the first checkpoint's mask kind and ratio)."""
    seed = sampling.SEED if seed is None else seed
    n_shown = sampling.SHOWN_IMAGES if n_shown is None else n_shown
    max_samples = sampling.MAX_SAMPLES if max_samples is None else max_samples
    loaded = load_comparable(checkpoints)
    cfg0 = loaded[0][0]
    batch = sampling.fixed_batch(cfg0, sampling.DIVERSITY_IMAGES, seed)
    shown = batch.head(n_shown)
    objectives = [cfg.objective for cfg, _, _ in loaded]
    paths: list[Path] = []
    entries = []
    for i, (cfg, _, models) in enumerate(loaded):
        model = models["pretrained"].to(device)
        patches = sampling.model_samples(model, batch, sampling.num_samples(cfg, max_samples), seed, device)[:, :n_shown]
        name = f"{prefix}_{cfg.objective}"
        if objectives.count(cfg.objective) > 1:
            name += f"_{i}"
        paths += plot_samples(model.cpu(), shown, patches, out_dir, name)
        entries.append((None, model, patches))
    if comparison and len(loaded) > 1:
        paths += plot_comparison(entries, shown, out_dir, name=f"{prefix}_comparison")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="checkpoints (full or weights-only), e.g. the LS, cIMLE and Masked VAE ones")
    parser.add_argument("--out", default="figures", help="figure folder (default figures)")
    parser.add_argument("--no-comparison", action="store_true", help="only the per-checkpoint figures")
    parser.add_argument("--seed", type=int, default=None, help="images / masks / noise seed (default 0)")
    parser.add_argument("--images", type=int, default=None, help="rows (default 4)")
    args = parser.parse_args(argv)
    with cpu_threads(1):  # same reduction order on every run: byte-identical figures
        paths = redraw(args.checkpoints, args.out, comparison=not args.no_comparison, seed=args.seed,
                       n_shown=args.images)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
