"""Synthetic images whose masked patches differ between classes in their modes, not their mean.

The toy's idea carried into pixels. Every patch of a class-``c`` image is

    patch_j = cue * b_j * u_c + D g + mean_shift * cue * v_c + noise_std * eps_j,

with ``b_j = +-1`` per patch, ``g ~ N(0, distractor^2 I)`` shared by the image, and
``u_c``, the distractor directions ``D`` and ``v_c`` from one orthonormal basis
(``pattern_seed``). At ``mean_shift = 0`` the conditional mean of a masked patch does
not depend on the class, so least squares has nothing to learn about ``c``, while the
patch is bimodal along ``u_c``, which a model of the distribution must know. The
shared distractor gives least squares something to predict and hides the class from
a random encoder; ``cue / distractor`` trades the two. Everything is Gaussian given
(c, b), so the least-squares floor is analytic (:meth:`bayes_floor`), and
:meth:`strip` and :attr:`modes` give the Context-Completion oracle its known answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = [
    "SyntheticImageGenerator",
    "SyntheticImages",
    "SyntheticImageDataset",
    "patchify",
    "unpatchify",
]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, L, C, p, p]`` in row-major patch order (the ViT's order)."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c, p, p)


def unpatchify(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, L, C, p, p]`` -> ``[N, C, grid*p, grid*p]``; inverse of :func:`patchify`."""
    n, _, c, p, _ = patches.shape
    x = patches.reshape(n, grid, grid, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, grid * p, grid * p)


@dataclass
class SyntheticImages:
    images: torch.Tensor  # [N, C, H, W] float32
    labels: torch.Tensor  # [N] int64 class ids
    signs: torch.Tensor  # [N, L] int8, +1 / -1: which mode each patch shows
    distractors: torch.Tensor | None = None  # [N, M] the image's distractor g (None: no distractor)

    def __len__(self) -> int:
        return self.labels.shape[0]


class PatchModeGenerator:
    """What both synthetic generators share: every class has two patch modes (``self.modes``,
    ``[2K, C, p, p]``, mode ``2c + (sign < 0)``), images are drawn by ``sample``, and an oracle
    reads a patch after ``strip`` (which removes what is not class structure)."""

    num_classes: int
    modes: torch.Tensor
    patterns: torch.Tensor

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> SyntheticImages:
        raise NotImplementedError

    def strip(self, patches: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, per_class: int, seed: int = 0) -> SyntheticImages:
        """``per_class`` images of every class, deterministic in ``seed``; order is shuffled
        (a fixed permutation from the same seed)."""
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(labels.shape[0], generator=gen)]
        return self.sample(labels, gen)

    def plausible_modes(self, labels: torch.Tensor) -> torch.Tensor:
        """Per image, what may lie (stripped) under any masked patch: ``[N, 2, C, p, p]`` (the two
        modes of its class, equally likely, plus noise)."""
        return self.modes.reshape(self.num_classes, 2, *self.patterns.shape[1:])[labels]

    def patch_mode_labels(self, labels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Mode id ``2c + (sign < 0)`` of every patch: ``[N, L]`` int64 in ``[0, 2K)``."""
        return 2 * labels[:, None].to(torch.int64) + (signs < 0).to(torch.int64)

    def nearest_mode(self, patches: torch.Tensor) -> torch.Tensor:
        """Bayes-optimal mode id of each patch ``[..., C, p, p]`` -> ``[...]``: the nearest mode
        after ``strip`` (equal priors, isotropic Gaussian noise)."""
        flat = self.strip(patches).reshape(-1, self.modes[0].numel())
        d = torch.cdist(flat, self.modes.reshape(2 * self.num_classes, -1))
        return d.argmin(dim=1).reshape(patches.shape[:-3])


class SyntheticImageGenerator(PatchModeGenerator):
    """Class axes, distractor directions and a sampler; see the module docstring for the model."""

    def __init__(self, num_classes: int, img_size: int, patch_size: int, in_chans: int = 1, *,
                 mean_shift: float = 0.0, cue: float = 2.0, distractor: float = 1.0, distractor_dims: int = 8,
                 noise_std: float = 0.1, pattern_seed: int = 0) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        if not 0.0 <= mean_shift <= 1.0:
            raise ValueError(f"mean_shift must be in [0, 1], got {mean_shift}")
        if noise_std < 0 or cue <= 0 or distractor < 0 or distractor_dims < 1:
            raise ValueError(f"need cue > 0, distractor >= 0, distractor_dims >= 1 and noise_std >= 0, "
                             f"got {cue}, {distractor}, {distractor_dims}, {noise_std}")
        dim = in_chans * patch_size**2
        if 2 * num_classes + distractor_dims > dim:
            raise ValueError(f"a patch of {dim} values cannot hold {num_classes} class axes, {num_classes} mean "
                             f"patterns and {distractor_dims} distractor directions (need 2 C + M <= {dim})")
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.patch_dim = dim
        self.mean_shift = float(mean_shift)
        self.cue = float(cue)
        self.distractor = float(distractor)
        self.distractor_dims = int(distractor_dims)
        self.noise_std = float(noise_std)
        self.pattern_seed = pattern_seed
        gen = torch.Generator().manual_seed(10_007 + pattern_seed)
        basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        basis = basis.float().T  # rows orthonormal, [dim, dim]
        C, M = num_classes, self.distractor_dims
        shape = (in_chans, patch_size, patch_size)
        self.patterns = basis[:C].reshape(C, *shape).contiguous()  # u_c, unit norm
        self.distractor_dirs = basis[C : C + M].contiguous()  # [M, dim]
        self.offsets = basis[C + M : 2 * C + M].reshape(C, *shape).contiguous()  # v_c, unit norm

    # ----------------------------------------------------------------- analytic quantities

    def _posterior_var(self, num_visible: int) -> float:
        """Posterior variance of each coordinate of g given ``num_visible`` visible patches."""
        if self.distractor == 0:
            return 0.0
        if self.noise_std == 0:
            return 0.0 if num_visible > 0 else self.distractor**2
        return 1.0 / (1.0 / self.distractor**2 + num_visible / self.noise_std**2)

    def bayes_floor(self, num_visible: int) -> float:
        """E||masked patch - E[masked | visible]||^2 per pixel: the least-squares floor.

        Exact at ``mean_shift = 0`` (E[masked | visible] = D E[g | visible]); at
        ``mean_shift > 0`` it assumes the visible patches name the class (their
        class offset is far above the noise), i.e. it is the floor given c."""
        M = self.distractor_dims
        return (self.cue**2 + M * self._posterior_var(num_visible) + self.patch_dim * self.noise_std**2) / self.patch_dim

    def mode_floor(self, num_visible: int) -> float:
        """The floor of a model that knows each masked patch's mode (the cue term gone)."""
        M = self.distractor_dims
        return (M * self._posterior_var(num_visible) + self.patch_dim * self.noise_std**2) / self.patch_dim

    @property
    def modes(self) -> torch.Tensor:
        """The ``2C`` stripped clean patch contents ``[2C, C_in, p, p]``: mode ``2c + (b < 0)`` is
        ``cue * (b * u_c + mean_shift * v_c)``."""
        base = self.mean_shift * self.offsets
        both = torch.stack([base + self.patterns, base - self.patterns], dim=1)  # [C, 2, C_in, p, p]
        return self.cue * both.reshape(2 * self.num_classes, *self.patterns.shape[1:])

    def class_mean_patch(self, labels: torch.Tensor) -> torch.Tensor:
        """Stripped conditional mean of any patch given the class: ``[N, C_in, p, p]``."""
        return self.cue * self.mean_shift * self.offsets[labels]

    def strip(self, patches: torch.Tensor) -> torch.Tensor:
        """Remove the distractor directions from patches ``[..., C_in, p, p]`` (what the oracle reads)."""
        flat = patches.reshape(*patches.shape[:-3], self.patch_dim).float()
        flat = flat - (flat @ self.distractor_dirs.T) @ self.distractor_dirs
        return flat.reshape(patches.shape)

    # ----------------------------------------------------------------- sampling

    def render(self, labels: torch.Tensor, signs: torch.Tensor, distractors: torch.Tensor,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[N, C_in, H, W]`` for ``labels`` [N], per-patch ``signs`` [N, L] and ``distractors`` [N, M]."""
        s = signs.to(torch.float32)[:, :, None, None, None]
        shared = (distractors @ self.distractor_dirs).reshape(-1, 1, *self.patterns.shape[1:])  # [N, 1, C, p, p]
        patches = self.cue * (s * self.patterns[labels][:, None] + self.mean_shift * self.offsets[labels][:, None])
        images = unpatchify(patches + shared, self.grid)
        if noise is not None:
            images = images + self.noise_std * noise
        return images

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> SyntheticImages:
        """Fresh images of the given classes (signs, distractor and noise drawn from ``generator``,
        or from torch's global RNG when None)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        n = labels.shape[0]
        signs = (torch.randint(0, 2, (n, self.num_patches), generator=generator, dtype=torch.int8) * 2 - 1)
        g = self.distractor * torch.randn(n, self.distractor_dims, generator=generator)
        noise = torch.randn(n, self.in_chans, self.img_size, self.img_size, generator=generator)
        return SyntheticImages(self.render(labels, signs, g, noise), labels, signs, g)

    # ----------------------------------------------------------------- oracle helpers

    def sample_patches(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` noisy patches ``[n, C_in, p, p]`` (with a distractor draw) and their mode ids ``[n]``
        (uniform over the ``2C`` modes): training data for an oracle patch classifier."""
        mode_ids = torch.randint(0, 2 * self.num_classes, (n,), generator=generator)
        g = self.distractor * torch.randn(n, self.distractor_dims, generator=generator)
        shared = (g @ self.distractor_dirs).reshape(n, *self.patterns.shape[1:])
        noise = torch.randn(n, *self.patterns.shape[1:], generator=generator)
        return self.modes[mode_ids] + shared + self.noise_std * noise, mode_ids



class SyntheticImageDataset(Dataset):
    """Synthetic images as an in-memory dataset of ``(image [C, H, W], label)``.

    ``fresh=True`` (used for the training split when ``data.augment`` is on)
    re-draws the signs and noise of item ``i`` (same class) at every access from
    torch's global RNG: the generator's analogue of augmentation, infinite data
    from the same distribution. Geometric augmentation is never applied; a crop
    or flip would break the patch-aligned construction (a flipped grating is
    another class's grating).

    Implements ``__getitems__`` so a DataLoader fetches a batch in one call.
    """

    mean = (0.0,)
    std = (1.0,)

    def __init__(self, generator: SyntheticImageGenerator, data: SyntheticImages, *, fresh: bool = False) -> None:
        self.generator = generator
        self.data = data
        self.fresh = fresh
        self.labels = data.labels
        self.targets = data.labels.tolist()
        self.num_classes = generator.num_classes
        self.mean = (0.0,) * generator.in_chans
        self.std = (1.0,) * generator.in_chans

    def __len__(self) -> int:
        return len(self.data)

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.data.labels[idx]
        if self.fresh:
            return self.generator.sample(labels).images, labels
        return self.data.images[idx], labels

    def __getitem__(self, i: int):
        images, labels = self._batch(torch.tensor([int(i)]))
        return images[0], int(labels[0])

    def __getitems__(self, indices: list[int]) -> list:
        images, labels = self._batch(torch.as_tensor(indices, dtype=torch.int64))
        return list(zip(images.unbind(0), labels.tolist()))
