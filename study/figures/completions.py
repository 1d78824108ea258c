"""Completions of real masked images by every objective, and how diverse they are against the data.

Rows are fixed validation images and masks (:func:`study.evaluation.samples.fixed_batch`),
columns the original, the masked input and each checkpoint's completions; the title
sets each method's sample diversity beside the data's. Real images have no known
conditional, so the data's is estimated the nonparametric way: the ``k`` training
images whose visible patches lie nearest the image's own, their masked patches taken
as draws of what could lie under the mask. At ratio 0.9 on MNIST two patches are
visible, so those neighbours are a fair sample of the broad conditional.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from study.data.datasets import build_eval_datasets, dataset_items
from study.evaluation import samples as sampling
from study.figures.samples import load_comparable, plot_comparison
from study.utils.device import cpu_threads

__all__ = ["nearest_visible_completions", "redraw", "main"]

SHORT = {("ls", None): "LS", ("cimle", "token"): "cIMLE-t", ("cimle", "image"): "cIMLE-i", ("mvae", None): "MVAE"}
LONG = {"LS": "least squares", "cIMLE-t": "cIMLE per token", "cIMLE-i": "cIMLE one z per image",
        "MVAE": "Masked VAE"}


def _short_label(cfg) -> str:
    select = cfg.cimle.select if cfg.objective == "cimle" else None
    return SHORT.get((cfg.objective, select), cfg.objective)


def nearest_visible_completions(model, train_images: Tensor, batch: sampling.SampleBatch, k: int) -> Tensor:
    """``[k, B, N, D]`` in the model's patch layout: for each image, the masked patches of the ``k``
    training images nearest it on its visible patches, the visible ones its own."""
    train = model.patchify(train_images)  # [T, N, D]
    own = model.patchify(batch.images)  # [B, N, D]
    out = []
    for b in range(own.shape[0]):
        visible = ~batch.mask[b]
        dist = (train[:, visible] - own[b, visible]).pow(2).sum((1, 2))  # [T]
        nearest = train[dist.topk(k, largest=False).indices]  # [k, N, D]
        out.append(torch.where(batch.mask[b][None, :, None], nearest, own[b][None]))
    return torch.stack(out, 1)


def redraw(checkpoints: Sequence[str | Path], out_dir: str | Path = "figures", *, shown: int = 4,
           seed: int = sampling.SEED, name: str = "mnist_completions") -> list[Path]:
    """The figure for ``checkpoints`` (same data, model shape and mask), on the first one's images and masks."""
    loaded = load_comparable(checkpoints)
    cfg0 = loaded[0][0]
    train, val = build_eval_datasets(cfg0)
    batch = sampling.fixed_batch(cfg0, sampling.DIVERSITY_IMAGES, seed, val)
    k = sampling.MAX_SAMPLES
    entries, diversity = [], {}
    for cfg, _, models in loaded:
        model, label = models["pretrained"], _short_label(cfg)
        patches = sampling.model_samples(model, batch, k, seed)  # [k, B, N, D]
        diversity[label] = sampling.sample_diversity(patches, batch.mask)
        entries.append((label, model, patches[:shown, :sampling.SHOWN_IMAGES]))
    data = nearest_visible_completions(loaded[0][2]["pretrained"], dataset_items(train, list(range(len(train))))[0], batch, k)
    data_diversity = sampling.sample_diversity(data, batch.mask)
    title = (f"{cfg0.data.name}, mask ratio {cfg0.mask.ratio:g}, {cfg0.epochs} epochs: "
             + ", ".join(f"{label} = {LONG.get(label, label)}" for label in diversity)
             + f". Sample diversity ({k} draws, {batch.images.shape[0]} images): data {data_diversity:.2f} "
             f"(the {k} training images nearest on the visible patches), "
             + ", ".join(f"{label} {value:.2f}" for label, value in diversity.items()))
    return plot_comparison(entries, batch.head(sampling.SHOWN_IMAGES), out_dir, name, title=title)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints of the same data and mask")
    parser.add_argument("--out", default="runs/figures", help="figure folder (default runs/figures)")
    args = parser.parse_args(argv)
    with cpu_threads(1):  # one reduction order: byte-identical figures
        for p in redraw(args.checkpoints, args.out):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
