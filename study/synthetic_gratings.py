"""First version of the synthetic images (``data.synthetic_kind: gratings``): per-class gratings.

Kept so that results and checkpoints made with it stay reproducible; the
study's synthetic images are now :mod:`study.synthetic_images` (``hidden``).
Here the class is visible in every patch, so a random encoder already reads
it (100 % probe) and nothing separates the objectives.

The toy's idea carried into pixels. An image of ``img_size`` is a grid of
``patch_size`` patches (the ViT's own grid). Class ``c`` owns two fixed patch
patterns, a *mode pattern* ``P_c`` and a *mean pattern* ``Q_c`` (each
``[C, p, p]``, zero mean over its pixels, unit RMS, and all ``2K`` of them
mutually orthogonal when ``2K <= C*p*p - 1``). Every patch ``j`` of an image of
class ``c`` independently shows

    patch_j = amplitude * (s_j * P_c + mean_shift * Q_c) + noise_std * eps,
    s_j = +1 or -1 with probability 1/2,  eps ~ N(0, I).

* Any visible patch reveals ``c`` (up to the sign ``s_j``).
* Given the visible patches, a masked patch is one of the two *modes*
  ``amplitude * (mean_shift * Q_c +/- P_c)`` (plus noise), each with
  probability 1/2, independent of everything visible. Its conditional mean is
  ``amplitude * mean_shift * Q_c``.
* ``mean_shift = 0``: the conditional mean is 0 for every class. A least-squares
  decoder is optimal when it predicts 0 everywhere and needs nothing from the
  encoder; a distribution-fitting decoder (cIMLE) must put its samples on
  ``+/- P_c`` and so must know ``c``.
* ``mean_shift = 1``: classes also differ in their mean (``Q_c``), which least
  squares can learn. The knob moves continuously between the two regimes.

Patterns start as oriented sinusoidal gratings (orientation and phase per
class, one cycle per patch, plus a fixed random texture so the set has full
rank at any patch size) and are made orthonormal by symmetric (Loewdin)
orthogonalisation, which keeps each pattern as close as possible to its
grating. They depend only on ``pattern_seed``; the images on ``seed``.

Pixel values: float32, zero-centred, not clipped. A clean patch has per-pixel
RMS ``amplitude * sqrt(1 + mean_shift**2)``; with the defaults
(``amplitude=1``, ``noise_std=0.1``) almost all values lie in [-4, 4] and the
pixel std is about 1, so no further normalisation is applied.

The Context-Completion analog (an oracle that names what lies under a patch):

* :meth:`GratingImageGenerator.modes` - the ``2K`` clean patch contents; mode
  ``2c`` is ``+P_c`` and ``2c + 1`` is ``-P_c`` (both with the class offset).
* :meth:`~GratingImageGenerator.plausible_modes` - per image, the two modes
  that may lie under any of its patches, ``[N, 2, C, p, p]``.
* :meth:`~GratingImageGenerator.patch_mode_labels` - the mode id that each
  patch of each image shows, ``[N, num_patches]``.
* :meth:`~GratingImageGenerator.sample_patches` - noisy patches with their
  mode ids, to train an oracle patch classifier on the generator's own data.
* :meth:`~GratingImageGenerator.nearest_mode` - the Bayes classifier for a
  patch (isotropic Gaussian noise and equal priors within a class: nearest mode).
"""

from __future__ import annotations

import math

import torch

from study.synthetic_images import PatchModeGenerator, SyntheticImages, unpatchify

__all__ = ["GratingImageGenerator"]


def _loewdin(vectors: torch.Tensor) -> torch.Tensor:
    """Symmetric orthonormalisation of the rows of ``vectors`` (closest orthonormal set)."""
    u, _, vh = torch.linalg.svd(vectors, full_matrices=False)
    return u @ vh


class GratingImageGenerator(PatchModeGenerator):
    """Class patterns plus a sampler; see the module docstring for the model."""

    def __init__(self, num_classes: int, img_size: int, patch_size: int, in_chans: int = 1, *,
                 mean_shift: float = 0.0, amplitude: float = 1.0, noise_std: float = 0.1,
                 pattern_seed: int = 0) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        if not 0.0 <= mean_shift <= 1.0:
            raise ValueError(f"mean_shift must be in [0, 1], got {mean_shift}")
        if noise_std < 0 or amplitude <= 0:
            raise ValueError(f"need amplitude > 0 and noise_std >= 0, got {amplitude}, {noise_std}")
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.mean_shift = float(mean_shift)
        self.amplitude = float(amplitude)
        self.noise_std = float(noise_std)
        self.pattern_seed = pattern_seed
        self.patterns, self.offsets = self._make_patterns()  # [K, C, p, p] each

    # ----------------------------------------------------------------- patterns

    def _make_patterns(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, c, p = self.num_classes, self.in_chans, self.patch_size
        gen = torch.Generator().manual_seed(10_007 + self.pattern_seed)
        coords = (torch.arange(p, dtype=torch.float64) + 0.5) / p
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        rows = []
        for i in range(2 * k):  # P_0..P_{K-1}, then Q_0..Q_{K-1}
            theta = math.pi * (i % k) / k + (math.pi / (2 * k) if i >= k else 0.0)
            phase = 2 * math.pi * torch.rand((), generator=gen, dtype=torch.float64)
            chan_phase = 2 * math.pi * torch.rand(c, generator=gen, dtype=torch.float64)
            grating = torch.stack([
                torch.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) + phase + chan_phase[ch])
                for ch in range(c)
            ])
            texture = torch.randn(c, p, p, generator=gen, dtype=torch.float64)
            rows.append((grating + 0.5 * texture).flatten())
        vecs = torch.stack(rows)
        vecs = vecs - vecs.mean(dim=1, keepdim=True)  # zero mean over the patch's pixels
        if vecs.shape[0] <= vecs.shape[1] - 1:
            vecs = _loewdin(vecs)  # orthonormal, still zero mean (rows lie in the zero-mean subspace)
        vecs = vecs / vecs.pow(2).mean(dim=1, keepdim=True).sqrt()  # unit RMS per pixel
        vecs = vecs.float().reshape(2 * k, c, p, p)
        return vecs[:k].contiguous(), vecs[k:].contiguous()

    @property
    def modes(self) -> torch.Tensor:
        """The ``2K`` clean patch contents ``[2K, C, p, p]``: mode ``2c + (s < 0)`` is
        ``amplitude * (s * P_c + mean_shift * Q_c)``."""
        base = self.mean_shift * self.offsets
        both = torch.stack([base + self.patterns, base - self.patterns], dim=1)  # [K, 2, C, p, p]
        return self.amplitude * both.reshape(2 * self.num_classes, *self.patterns.shape[1:])

    def class_mean_patch(self, labels: torch.Tensor) -> torch.Tensor:
        """Conditional mean of any patch given the class: ``[N, C, p, p]``."""
        return self.amplitude * self.mean_shift * self.offsets[labels]

    # ----------------------------------------------------------------- sampling

    def render(self, labels: torch.Tensor, signs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[N, C, H, W]`` for class ``labels`` [N] and per-patch ``signs`` [N, L]."""
        s = signs.to(torch.float32)[:, :, None, None, None]
        patches = self.amplitude * (s * self.patterns[labels][:, None] + self.mean_shift * self.offsets[labels][:, None])
        images = unpatchify(patches, self.grid)
        if noise is not None:
            images = images + self.noise_std * noise
        return images

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> SyntheticImages:
        """Fresh images of the given classes (signs and noise drawn from ``generator``,
        or from torch's global RNG when None)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        n = labels.shape[0]
        signs = (torch.randint(0, 2, (n, self.num_patches), generator=generator, dtype=torch.int8) * 2 - 1)
        noise = torch.randn(n, self.in_chans, self.img_size, self.img_size, generator=generator)
        return SyntheticImages(self.render(labels, signs, noise), labels, signs, None)

    # ----------------------------------------------------------------- oracle helpers

    def sample_patches(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` noisy patches ``[n, C, p, p]`` and their mode ids ``[n]`` (uniform over
        the ``2K`` modes): training data for an oracle patch classifier."""
        mode_ids = torch.randint(0, 2 * self.num_classes, (n,), generator=generator)
        noise = torch.randn(n, *self.patterns.shape[1:], generator=generator)
        return self.modes[mode_ids] + self.noise_std * noise, mode_ids

    def strip(self, patches: torch.Tensor) -> torch.Tensor:
        """No distractor here: the oracle reads patches as they are."""
        return patches.float()
