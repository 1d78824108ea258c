"""Masks over the patch grid: random (MAE), block-wise (BEiT) and filtered noise (ColorMAE).

A mask is a bool tensor ``[B, N]`` over the patches in row-major order (MAE's
``patchify``); ``True`` = masked. Every kind masks exactly
``num_masked = floor(ratio * N + 0.5)`` patches in every image, because the encoder
runs on the visible tokens only and a batch must keep the same number of them (MAE
keeps ``int(N * (1 - ratio))``: one patch fewer masked at 0.9 of 196; both agree at
the usual ratios). ``block`` runs BEiT's rectangle process per image, in lockstep
over the batch, and tops the count up at random; ``noise`` masks the top-k of white
noise filtered in the Fourier domain (red: clustered, blue: dispersed, green: blobs
of a patch or two, white: as random). All randomness comes from an optional
:class:`torch.Generator`: the same state gives the same masks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from study.config import num_masked

if TYPE_CHECKING:  # pragma: no cover
    from study.config import MaskConfig

__all__ = [
    "KINDS",
    "FILTERS",
    "MaskGenerator",
    "build_mask_generator",
    "ids_from_mask",
    "MaskIndices",
    "mask_indices",
    "clustering_score",
    "noise_filter",
]

KINDS = ("random", "block", "noise")
FILTERS = ("red", "blue", "green", "white")

# BEiT block-wise masking
BLOCK_ASPECT = 0.3  # aspect ratio log-uniform in [0.3, 1/0.3]; unlike BEiT a block may span the whole grid
BLOCK_ATTEMPTS = 10  # rejected rectangles in a row before topping up at random
BLOCK_PROPOSALS = 4  # rectangles proposed per image per vectorised round (speed only)

# ColorMAE filters, radial frequency in units of Nyquist
RED_SIGMA = 0.25
BLUE_SIGMA = 1.0
GREEN_CENTER = 0.5
GREEN_WIDTH = 0.15
NOISE_PAD = 2  # noise drawn on a (2 gh, 2 gw) grid, top-left corner kept: the FFT's wrap-around stays outside


def _check_grid(grid) -> tuple[int, int]:
    try:
        gh, gw = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (gh, gw) of patch counts, got {grid!r}") from None
    for g in (gh, gw):
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise ValueError(f"grid must be a pair of integers >= 1, got {grid!r}")
    return int(gh), int(gw)


def noise_filter(kind: str, shape: tuple[int, int]) -> Tensor:
    """The ``rfft2`` transfer function ``[h, w // 2 + 1]`` of a ColorMAE filter on an ``h x w`` grid."""
    if kind not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {kind!r}")
    h, w = shape
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    r = torch.sqrt(fy**2 + fx**2) / 0.5  # [h, w//2+1], 1 = Nyquist
    if kind == "red":
        return torch.exp(-(r**2) / (2 * RED_SIGMA**2)).float()
    if kind == "blue":
        return (1 - torch.exp(-(r**2) / (2 * BLUE_SIGMA**2))).float()
    if kind == "green":
        return torch.exp(-((r - GREEN_CENTER) ** 2) / (2 * GREEN_WIDTH**2)).float()
    return torch.ones_like(r, dtype=torch.float32)


class MaskGenerator:
    """Draws ``[B, N]`` bool masks (True = masked) of one kind over a ``gh x gw`` patch grid.

    ``MaskGenerator(kind, ratio, grid, filter=..., block_min_patches=...)``;
    call it as ``gen(batch_size, generator=None, device=None)``.
    ``num_masked`` patches are masked in every image.
    """

    def __init__(
        self,
        kind: str,
        ratio: float,
        grid: tuple[int, int],
        *,
        filter: str = "green",
        block_min_patches: int = 4,
        block_max_patches: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
        self.grid = _check_grid(grid)
        gh, gw = self.grid
        self.num_patches = gh * gw
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not math.isfinite(ratio):
            raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1) (the fraction of patches masked), got {ratio}")
        masked = num_masked(ratio, self.num_patches)
        if not 0 < masked < self.num_patches:
            raise ValueError(
                f"ratio {ratio} masks {masked} of the {self.num_patches} patches of a {gh}x{gw} grid; "
                f"it must leave at least one patch masked and one visible"
            )
        if isinstance(block_min_patches, bool) or not isinstance(block_min_patches, (int, np.integer)) \
                or block_min_patches < 1:
            raise ValueError(f"block_min_patches must be an integer >= 1, got {block_min_patches!r}")
        if block_max_patches is not None and (
            isinstance(block_max_patches, bool) or not isinstance(block_max_patches, (int, np.integer))
            or block_max_patches < block_min_patches
        ):
            raise ValueError(
                f"block_max_patches must be None or an integer >= block_min_patches ({block_min_patches}), "
                f"got {block_max_patches!r}"
            )
        self.kind = kind
        self.ratio = float(ratio)
        self.filter = filter
        self.block_min_patches = int(block_min_patches)
        self.block_max_patches = None if block_max_patches is None else int(block_max_patches)
        self.num_masked = masked
        self.num_visible = self.num_patches - masked
        self._log_aspect = (math.log(BLOCK_ASPECT), math.log(1 / BLOCK_ASPECT))
        self._block_proposals = BLOCK_PROPOSALS
        self._pad_shape = (NOISE_PAD * gh, NOISE_PAD * gw)
        self._filter = noise_filter(filter, self._pad_shape) if kind == "noise" and filter != "white" else None
        self._filters: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        extra = {"noise": f", filter={self.filter!r}", "block": f", block_min_patches={self.block_min_patches}"}
        return (f"MaskGenerator(kind={self.kind!r}, ratio={self.ratio}, grid={self.grid}"
                f"{extra.get(self.kind, '')}; num_masked={self.num_masked})")

    # ------------------------------------------------------------------ drawing

    def __call__(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
        batch_size = int(batch_size)
        if batch_size == 0:  # (an empty FFT is an error in MKL)
            mask = torch.zeros(0, self.num_patches, dtype=torch.bool)
        elif self.kind == "random":
            mask = self._random(batch_size, generator)
        elif self.kind == "block":
            mask = self._block(batch_size, generator)
        else:
            mask = self._noise(batch_size, generator)
        mask = mask.cpu() if device is None else mask.to(device)
        return mask

    @staticmethod
    def _gen_device(generator: torch.Generator | None) -> torch.device:
        return generator.device if generator is not None else torch.device("cpu")

    def _top_k_mask(self, scores: Tensor) -> Tensor:
        """Mask the ``num_masked`` largest scores of each row."""
        idx = torch.topk(scores, self.num_masked, dim=1, sorted=False).indices
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return mask.scatter_(1, idx, True)

    def _random(self, b: int, generator: torch.Generator | None) -> Tensor:
        noise = torch.rand(b, self.num_patches, generator=generator, device=self._gen_device(generator))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first num_visible are kept (MAE)
        mask = torch.zeros(noise.shape, dtype=torch.bool, device=noise.device)
        return mask.scatter_(1, ids_shuffle[:, self.num_visible:], True)

    def _noise(self, b: int, generator: torch.Generator | None) -> Tensor:
        gh, gw = self.grid
        dev = self._gen_device(generator)
        if self._filter is None:  # white
            return self._top_k_mask(torch.randn(b, self.num_patches, generator=generator, device=dev))
        ph, pw = self._pad_shape
        white = torch.randn(b, ph, pw, generator=generator, device=dev)
        if dev not in self._filters:  # copied once per device: a copy from host memory each step would block
            self._filters[dev] = self._filter.to(dev)
        spec = torch.fft.rfft2(white) * self._filters[dev]
        field = torch.fft.irfft2(spec, s=(ph, pw))[:, :gh, :gw]  # [B, gh, gw]
        return self._top_k_mask(field.reshape(b, self.num_patches))

    def _block(self, b: int, generator: torch.Generator | None) -> Tensor:
        """BEiT's block-wise loop, run in lockstep over the batch (numpy), then a random top-up.

        Per image this is exactly BEiT's process: propose a rectangle, accept it
        if it adds between 1 and the still-missing number of patches, give up
        after ``BLOCK_ATTEMPTS`` rejections in a row. Each round makes one
        proposal for every image still filling, so the Python loop runs about
        as many rounds as the slowest image needs proposals (tens), not
        ``B x`` that.
        """
        gh, gw = self.grid
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=self._gen_device(generator)).item())
        rng = np.random.default_rng(seed)
        target = self.num_masked
        lo_a, hi_a = self._log_aspect
        min_area = float(self.block_min_patches)
        mask = np.zeros((b, gh, gw), dtype=bool)
        count = np.zeros(b, dtype=np.int64)
        fails = np.zeros(b, dtype=np.int64)
        active = np.arange(b)
        k = self._block_proposals
        tries = np.arange(k)[None, :]
        rows = np.arange(gh)[None, :]
        cols = np.arange(gw)[None, :]
        integral = np.zeros((b, gh + 1, gw + 1), dtype=np.int32)  # masked-patch counts of top-left rectangles
        while active.size:
            n = active.size
            max_new = target - count[active]
            if self.block_max_patches is not None:
                max_new = np.minimum(max_new, self.block_max_patches)
            u = rng.random((4, n, k))
            area = min_area + (max_new[:, None] - min_area) * u[0]
            aspect = np.exp(lo_a + (hi_a - lo_a) * u[1])
            h = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # [n, k]
            w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
            fits = (h >= 1) & (w >= 1) & (h <= gh) & (w <= gw)
            h = np.clip(h, 1, gh)
            w = np.clip(w, 1, gw)
            top = np.minimum((u[2] * (gh - h + 1)).astype(np.int64), gh - h)
            left = np.minimum((u[3] * (gw - w + 1)).astype(np.int64), gw - w)
            ii = np.arange(n)[:, None]
            si = integral[active]  # [n, gh+1, gw+1]
            covered = (si[ii, top + h, left + w] - si[ii, top, left + w]
                       - si[ii, top + h, left] + si[ii, top, left])  # [n, k]
            new = h * w - covered
            # proposals are BEiT's successive attempts: the first acceptable one wins,
            # and only while fewer than BLOCK_ATTEMPTS have failed in a row
            ok = fits & (new > 0) & (new <= max_new[:, None]) & (fails[active][:, None] + tries < BLOCK_ATTEMPTS)
            hit = ok.any(axis=1)
            first = ok.argmax(axis=1)
            sel = np.flatnonzero(hit)
            if sel.size:
                acc = active[sel]
                f = first[sel]
                t, hh, l, ww = top[sel, f, None], h[sel, f, None], left[sel, f, None], w[sel, f, None]
                rect = ((rows >= t) & (rows < t + hh))[:, :, None] & ((cols >= l) & (cols < l + ww))[:, None, :]
                mask[acc] |= rect
                integral[acc, 1:, 1:] = mask[acc].cumsum(axis=1, dtype=np.int32).cumsum(axis=2)
                count[acc] += new[sel, f]
                fails[acc] = 0
            fails[active[~hit]] += k
            active = active[(count[active] < target) & (fails[active] < BLOCK_ATTEMPTS)]
        flat = mask.reshape(b, self.num_patches)
        need = target - count
        short = np.flatnonzero(need > 0)
        if short.size:  # top up uniformly at random among each short image's unmasked patches
            scores = rng.random((short.size, self.num_patches))
            scores[flat[short]] = -1.0
            rank = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1, kind="stable")
            flat[short] |= rank < need[short, None]
        return torch.from_numpy(flat)


def build_mask_generator(cfg: "MaskConfig", grid: tuple[int, int]) -> MaskGenerator:
    """The :class:`MaskGenerator` of a :class:`study.config.MaskConfig` on a ``gh x gw`` patch grid."""
    return MaskGenerator(cfg.kind, cfg.ratio, grid, filter=cfg.filter, block_min_patches=cfg.block_min_patches)


def _check_mask(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = masked), got {getattr(mask, 'dtype', type(mask))}")
    if mask.ndim == 1:
        mask = mask[None]
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, N] (or [N]), got shape {tuple(mask.shape)}")
    return mask


def ids_from_mask(mask: Tensor, num_masked: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE index tensors of a bool mask ``[B, N]`` (True = masked, every row masking equally many).

    Returns ``ids_keep [B, N_vis]`` and ``ids_masked [B, N_mask]`` (patch
    indices, each ascending within a row) and ``ids_restore [B, N]`` such that
    ``torch.gather(torch.cat([visible, masked], 1), 1, ids_restore[..., None].expand(-1, -1, D))``
    puts tokens back in patch order, where ``visible = gather(x, ids_keep)`` and
    ``masked = gather(x, ids_masked)``. :func:`mask_indices` wraps this one.

    ``num_masked``: the patches masked per row, where the caller knows it (a
    :class:`MaskGenerator`'s ``num_masked``); without it the count is read
    from the mask, a host sync on CUDA. The check that every row masks as
    many runs on CPU tensors only, so that a CUDA step makes no host sync, and
    outside compiled graphs, which cannot branch on a tensor's value.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = masked), got {getattr(mask, 'dtype', type(mask))}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, N], got shape {tuple(mask.shape)}")
    on_cpu = mask.device.type == "cpu"
    counts = mask.sum(dim=1) if num_masked is None or on_cpu else None  # off the CPU with a count: not needed
    if num_masked is None:
        num_masked = int(counts[0]) if mask.shape[0] else 0
    if on_cpu and not torch.compiler.is_compiling() and bool((counts != num_masked).any()):
        raise ValueError(
            f"every mask row must mask the same number of patches ({num_masked}), got counts "
            f"{sorted(set(counts.tolist()))}"
        )
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible ascending, then masked ascending
    ids_restore = torch.argsort(order, dim=1)
    num_visible = mask.shape[1] - num_masked
    return order[:, :num_visible], order[:, num_visible:], ids_restore


def clustering_score(mask: Tensor, grid: tuple[int, int], *, normalize: bool = True) -> float:
    """How spatially clustered masks are: 1 = like random masking, > 1 clustered, < 1 dispersed.

    Per image: the mean over masked patches of the fraction of their
    4-neighbours (inside the grid) that are masked, divided by its expectation
    under uniformly random masking of the same count, ``(K - 1) / (N - 1)``
    (exact for any grid). Averaged over the batch. Images with fewer than two
    masked patches, or all patches masked, are skipped (NaN if nothing is left).
    ``normalize=False`` gives the raw mean fraction.
    """
    gh, gw = _check_grid(grid)
    mask = _check_mask(mask)
    if mask.shape[1] != gh * gw:
        raise ValueError(f"mask has {mask.shape[1]} patches per row, grid {gh}x{gw} has {gh * gw}")
    m = mask.detach().cpu().reshape(-1, gh, gw).float()
    nb = torch.zeros_like(m)  # masked neighbours
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[:, :, 1:] += m[:, :, :-1]
    nb[:, :, :-1] += m[:, :, 1:]
    ones = torch.ones(gh, gw)
    deg = torch.zeros(gh, gw)
    deg[1:] += ones[:-1]
    deg[:-1] += ones[1:]
    deg[:, 1:] += ones[:, :-1]
    deg[:, :-1] += ones[:, 1:]
    frac = torch.where(deg > 0, nb / deg.clamp_min(1), torch.zeros(()))  # [B, gh, gw]
    k = m.sum(dim=(1, 2))  # [B]
    n = gh * gw
    raw = (frac * m).sum(dim=(1, 2)) / k.clamp_min(1)
    ok = (k >= 2) & (k < n) & bool((deg > 0).any())
    if not bool(ok.any()):
        return float("nan")
    if normalize:
        raw = raw / ((k - 1) / (n - 1)).clamp_min(1e-12)
    return float(raw[ok].mean())


class MaskIndices(NamedTuple):
    keep: Tensor  # [B, N_vis] visible patch indices, ascending
    masked: Tensor  # [B, N_mask] masked patch indices, ascending
    restore: Tensor  # [B, N] position of patch n in the order (visible, masked)
    num_masked: int


def mask_indices(mask: Tensor, num_patches: int | None = None, num_masked: int | None = None) -> MaskIndices:
    """Index tensors of a bool mask ``[B, N]`` (True = masked); see :func:`ids_from_mask`."""
    if num_patches is not None and mask.ndim == 2 and mask.shape[1] != num_patches:
        raise ValueError(f"mask has {mask.shape[1]} patches per row, the model has {num_patches}")
    keep, masked, restore = ids_from_mask(mask, num_masked)
    return MaskIndices(keep, masked, restore, masked.shape[1])
