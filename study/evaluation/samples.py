"""Samples of a checkpoint's decoder: completed images, sample diversity, the ``samples`` protocol.

Fixed-seed validation images, each with one fixed mask of the checkpoint's own kind
and ratio, are completed by the model: least squares' single reconstruction, or
``k = min(cimle.k, 8)`` samples with ``z ~ N(0, I)`` (cIMLE; the Masked VAE from its
prior, as at test time). Visible patches are pasted from the input.
``sample_diversity`` is, per image, the mean L2 distance between pairs of completions
on the masked patches (in the model's input space), averaged over
``DIVERSITY_IMAGES`` images; it is computed, never assumed, so least squares' 0 is a
measurement. Figures are drawn by :mod:`study.figures.samples`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from study.data.datasets import build_eval_datasets, dataset_items
from study.data.masking import build_mask_generator

__all__ = [
    "MAX_SAMPLES", "SHOWN_IMAGES", "DIVERSITY_IMAGES", "SEED",
    "SampleBatch", "SamplesDrawing", "fixed_batch", "num_samples", "completed_patches", "model_samples",
    "sample_diversity", "samples_protocol",
]

MAX_SAMPLES = 8  # cap on k for figures and diversity
SHOWN_IMAGES = 4  # images (rows) in a figure
DIVERSITY_IMAGES = 64  # images the diversity is averaged over
SEED = 0  # images, masks and sample noise are drawn from generators seeded from this


@dataclass
class SampleBatch:
    """Fixed evaluation images with one mask each."""

    images: Tensor  # [B, C, H, W] model input (dataset-normalised)
    labels: Tensor  # [B] int64
    mask: Tensor  # [B, N] bool, True = masked
    indices: Tensor  # [B] indices into the validation split

    def head(self, n: int) -> "SampleBatch":
        return SampleBatch(self.images[:n], self.labels[:n], self.mask[:n], self.indices[:n])


def fixed_batch(cfg, n: int, seed: int = SEED, dataset=None) -> SampleBatch:
    """``n`` validation images picked by a seeded permutation, and seeded masks of ``cfg.mask``.

    The same ``(cfg data/model/mask, n, seed)`` always gives the same batch.
    ``dataset``: the validation split (default: ``build_eval_datasets(cfg)[1]``).
    """
    if dataset is None:
        dataset = build_eval_datasets(cfg)[1]
    n = min(int(n), len(dataset))
    if n < 1:
        raise ValueError("need at least one image")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    images, labels = dataset_items(dataset, idx.tolist())
    grid = cfg.patch_grid
    mask = build_mask_generator(cfg.mask, grid)(n, generator=torch.Generator().manual_seed(seed + 1))
    return SampleBatch(images, labels, mask, idx)


def num_samples(cfg, cap: int = MAX_SAMPLES) -> int:
    """Samples drawn per image: ``min(cimle.k, cap)``, at least 2 (the diversity needs a pair).

    Least squares draws as many as the others (its outputs are all the same); figures show one."""
    return max(2, min(int(cfg.cimle.k), int(cap)))


@torch.no_grad()
def completed_patches(model, images: Tensor, mask: Tensor, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """``n`` completions in the model's patch layout ``[n, B, N, p*p*C]``, pixel space (de-normalised):
    masked patches from the model, visible ones pasted from ``images``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        imgs = images.to(device)
        m = mask.to(device)
        pred = model.sample(imgs, m, n, generator=generator)  # [n, B, N, D]
        pred = model.denormalize_pred(pred.float(), imgs)
        target = model.patchify(imgs).float()  # [B, N, D]
        out = torch.where(m[None, :, :, None], pred, target[None])
    finally:
        model.train(was_training)
    return out.cpu()


def model_samples(model, batch: SampleBatch, k: int, seed: int = SEED, device=None) -> Tensor:
    """:func:`completed_patches` of ``batch`` with noise from a generator seeded by ``seed``
    (the draw that the ``samples`` protocol and :mod:`study.figures.samples` share)."""
    return completed_patches(model, batch.images, batch.mask, k, torch.Generator().manual_seed(seed + 2), device)


def sample_diversity(samples: Tensor, mask: Tensor) -> float:
    """Mean pairwise L2 distance between samples on the masked patches.

    ``samples [k, B, N, D]`` (k >= 2), ``mask [B, N]`` bool. For each image the
    mean over pairs ``i < j`` of ``||s_i - s_j||_2`` over the masked patches'
    values, then the mean over images. Exactly 0 for identical samples."""
    if samples.ndim != 4 or samples.shape[1:3] != mask.shape:
        raise ValueError(f"samples must be [k, B, N, D] with mask [B, N], got {tuple(samples.shape)} and "
                         f"{tuple(mask.shape)}")
    k = samples.shape[0]
    if k < 2:
        raise ValueError("sample diversity needs at least 2 samples")
    x = samples.double() * mask[None, :, :, None].to(torch.float64)  # visible patches contribute 0
    x = x.flatten(2).transpose(0, 1)  # [B, k, N*D]
    i, j = torch.triu_indices(k, k, 1)
    d = (x[:, i] - x[:, j]).pow(2).sum(-1).sqrt()  # [B, pairs]
    return float(d.mean())


# --------------------------------------------------------------------------- the protocol


@dataclass
class SamplesDrawing:
    """What the samples figure of one model shows; the caller draws it (:mod:`study.figures.samples`)."""

    model: torch.nn.Module
    batch: SampleBatch  # the shown images and masks
    patches: Tensor  # [k, B, N, p*p*C] their completions, pixel space
    name: str  # figure file name, without suffix


def samples_protocol(cfg, models: dict, *, on_samples: Callable[[SamplesDrawing], object] | None = None,
                     device="cpu", n_images: int = DIVERSITY_IMAGES, n_shown: int = SHOWN_IMAGES, seed: int = SEED,
                     max_samples: int = MAX_SAMPLES, name: str | None = None) -> list[dict]:
    """Diversity rows for each model in ``models``; ``on_samples`` gets the pretrained model's drawing.

    Returns ``[{"encoder", "metric", "value", **settings}]``: ``sample_diversity``
    and ``samples_seconds`` per model. The drawing is named ``name`` (default
    ``samples_<objective>``)."""
    batch = fixed_batch(cfg, n_images, seed)
    k = num_samples(cfg, max_samples)
    extra = {"samples_k": k, "samples_images": int(batch.images.shape[0]), "samples_seed": seed}
    rows = []
    for enc_name, model in models.items():
        t0 = time.perf_counter()
        model.to(device)
        patches = model_samples(model, batch, k, seed, device)
        div = sample_diversity(patches, batch.mask)
        model.cpu()
        if enc_name == "pretrained" and on_samples is not None:
            on_samples(SamplesDrawing(model, batch.head(n_shown), patches[:, :n_shown],
                                      name or f"samples_{cfg.objective}"))
        seconds = time.perf_counter() - t0
        rows.append({"encoder": enc_name, "metric": "sample_diversity", "value": div, **extra})
        rows.append({"encoder": enc_name, "metric": "samples_seconds", "value": seconds, **extra})
    return rows
