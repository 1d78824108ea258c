"""How much a sampler needs its encoder: the objective's masked loss with each image's own latent
against the loss with another image's.

Validation images go through in batches under one shared mask per batch, so
every image's decoder state ``hidden [B, 1+N, Dd]`` (the encoder's latent,
up to where the noise enters) fits every other image's mask. The state of
image i is replaced by that of image i + 1 (the batch rolled by one) and the
objective's own loss is taken against image i's targets: least squares for
LS, the nearest-of-k loss for cIMLE at its training k (per token or per
image, as trained), with the same noise draws in both passes. A decoder
whose k samples cover the masked content whatever the latent says loses
little (``swap_gain`` near 0): its noise has replaced the encoder. One that
can place its samples only with the encoder's help loses a lot.
"""

from __future__ import annotations

import torch

from study.data.datasets import dataset_items
from study.data.masking import build_mask_generator, mask_indices
from study.methods.base import Context

__all__ = ["latent_swap", "BATCH", "REPEATS", "SEED"]

BATCH = 250  # images per shared mask
REPEATS = 4  # masks per batch
SEED = 0


@torch.no_grad()
def latent_swap(model, cfg, dataset, *, batch_size: int = BATCH, repeats: int = REPEATS,
                seed: int = SEED) -> dict[str, float]:
    """``{swap_own_loss, swap_other_loss, swap_gain}`` over ``dataset`` (the validation split):
    mean losses with the own and the rolled latent, and ``other / own - 1``."""
    if len(dataset) < 2:
        raise ValueError("the latent swap needs at least 2 images")
    was_training = model.training
    model.eval()
    masks = build_mask_generator(cfg.mask, cfg.patch_grid)
    mask_gen = torch.Generator().manual_seed(seed)
    total = {"own": 0.0, "other": 0.0}
    count, draw = 0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            indices = list(range(start, min(start + batch_size, len(dataset))))
            if len(indices) < 2:  # a lone image has no other to borrow from
                break
            imgs = dataset_items(dataset, indices)[0]
            target = model.target(imgs)
            for _ in range(repeats):
                mask = masks(1, generator=mask_gen).repeat(len(indices), 1)  # [B, N], one mask for all
                ids = mask_indices(mask, model.num_patches)
                hidden = model.decoder.prefix(model.encoder(imgs, ids.keep), ids.restore)  # [B, 1+N, Dd]
                for name, state in (("own", hidden), ("other", hidden.roll(1, 0))):
                    noise = torch.Generator().manual_seed(seed + 1 + draw)  # the same draws for both
                    out = model.method.loss(model, Context(imgs, mask, ids, state, target, noise, None))
                    total[name] += float(out.loss) * len(indices)
                count += len(indices)
                draw += 1
    finally:
        model.train(was_training)
    own, other = total["own"] / count, total["other"] / count
    return {"swap_own_loss": own, "swap_other_loss": other, "swap_gain": other / own - 1.0}
