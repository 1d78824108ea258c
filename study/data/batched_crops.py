"""Random resized crops of a whole batch at once, on whatever device holds it.

    boxes = crop_boxes(heights, widths, scale, ratio, generator)   # torchvision's sampling, per image
    out = resample(x, boxes, size, flip)                             # one grid_sample for the batch

The boxes are drawn exactly as torchvision's ``RandomResizedCrop.get_params``
draws them (10 tries of area fraction in ``scale`` and log-uniform aspect in
``ratio``, then the whole image with the aspect clamped, centred), but for a
batch of images of different sizes in one set of tensor operations. A box is
expressed in normalised coordinates of its image, so the same box can be
sampled from any resampled copy of that image: a packed store holds each
image squashed to S x S (:mod:`study.data.packed`), and the crop of the original's
box is taken from the squashed copy, which is a linear map of the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CropBoxes", "crop_boxes", "resample", "random_resized_crop"]

TRIES = 10  # torchvision's number of tries before the centre-crop fallback


@dataclass
class CropBoxes:
    """Per-image crop boxes in pixels of the original image (floats holding integers), each ``[B]``."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    image_height: torch.Tensor
    image_width: torch.Tensor


def crop_boxes(heights: torch.Tensor | int, widths: torch.Tensor | int, batch: int, scale: tuple[float, float],
               ratio: tuple[float, float], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> CropBoxes:
    """torchvision's RandomResizedCrop boxes for ``batch`` images of the given sizes (ints or ``[B]`` tensors)."""
    if device is None:
        device = generator.device if generator is not None else "cpu"
    h = torch.as_tensor(heights, dtype=torch.float32, device=device).expand(batch)[:, None]  # [B, 1]
    w = torch.as_tensor(widths, dtype=torch.float32, device=device).expand(batch)[:, None]
    area = h * w * torch.empty(batch, TRIES, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(batch, TRIES, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                             generator=generator)
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).round()
    ch = torch.sqrt(area / r).round()
    ok = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
    cw = cw.gather(1, first).squeeze(1)
    ch = ch.gather(1, first).squeeze(1)
    h, w = h.squeeze(1), w.squeeze(1)
    # fallback (torchvision): the whole image, its aspect ratio clamped into `ratio`
    in_ratio = w / h
    # in double precision, as torchvision's Python arithmetic
    fw = torch.where(in_ratio > ratio[1], torch.round(h.double() * ratio[1]).float(), w)
    fh = torch.where(in_ratio < ratio[0], torch.round(w.double() / ratio[0]).float(), h)
    none = ~ok.any(dim=1)
    cw = torch.where(none, fw, cw)
    ch = torch.where(none, fh, ch)
    u = torch.rand(batch, 2, generator=generator, device=device)
    left = torch.floor(u[:, 0] * (w - cw + 1)).minimum(w - cw)
    top = torch.floor(u[:, 1] * (h - ch + 1)).minimum(h - ch)
    left = torch.where(none, torch.div(w - cw, 2, rounding_mode="floor"), left)
    top = torch.where(none, torch.div(h - ch, 2, rounding_mode="floor"), top)
    return CropBoxes(top, left, ch, cw, h, w)


def resample(x: torch.Tensor, boxes: CropBoxes, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box resampled to ``size x size`` (bicubic), mirrored where ``flip``; ``x`` is ``[B, C, H, W]``.

    ``x`` may be any resampling of the images the boxes were drawn on (its own
    ``H x W``): the boxes are mapped through normalised coordinates.
    """
    b = boxes
    # crop [left, left + width) in pixel-edge coordinates -> normalised [-1, 1] (align_corners=False)
    sx = b.width / b.image_width
    sy = b.height / b.image_height
    tx = (2 * b.left + b.width) / b.image_width - 1
    ty = (2 * b.top + b.height) / b.image_height - 1
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    # axis-aligned affine grid, built by broadcasting (affine_grid's bmm is slower than the sampling)
    base = (torch.arange(size, dtype=x.dtype, device=x.device) * 2 + 1) / size - 1  # output pixel centres
    gx = sx.to(x.dtype)[:, None] * base[None, :] + tx.to(x.dtype)[:, None]  # [B, size]
    gy = sy.to(x.dtype)[:, None] * base[None, :] + ty.to(x.dtype)[:, None]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [B, size, size, 2]
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        hflip: bool = False, generator: torch.Generator | None = None,
                        clamp: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """Batched RandomResizedCrop (+ optional horizontal flip) of equally sized images ``[B, C, H, W]``.

    Returns ``[B, C, size, size]``, bicubic, clamped to ``clamp`` (bicubic
    overshoots). Randomness from ``generator`` or torch's global RNG.
    """
    bsz, _, h, w = x.shape
    boxes = crop_boxes(h, w, bsz, scale, ratio, generator, device=x.device)
    flip = torch.rand(bsz, generator=generator, device=x.device) < 0.5 if hflip else None
    out = resample(x, boxes, size, flip)
    return out.clamp_(*clamp) if clamp is not None else out
