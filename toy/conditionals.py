"""Synthetic conditionals that share their mean but differ in multimodality.

The generative story (one draw):

    c     ~ Uniform{0, ..., C-1}                                  class
    x     = R [a p_c ; sigma_d n],    n ~ N(0, I)                 context, [dx]
    y     = (1 - s) m_c + b r_c u_c + sigma_y e,  b = +-1, e ~ N(0, I)   target, [dy]

* ``p_c`` are class prototypes on a circle in the first ``d_signal`` coordinates
  (linearly separable: every prototype is a vertex of their convex hull). The
  other ``dx - d_signal`` coordinates are distractors with a larger spread, and
  a fixed random rotation ``R`` hides the signal plane among them. A random
  low-dimensional encoder therefore mixes a little class signal with a lot of
  distractor variance and its linear probe sits near chance; an encoder that
  has *learned* the signal plane separates the classes exactly.
* x determines c exactly (the signal coordinates carry no noise), so
  E[y | x] = E[y | c] = (1 - s) m_c: the modes +-r_c u_c are symmetric and
  average out.
* Mask strength ``s`` in [0, 1] shrinks the class means to the common mean 0.
  At s = 0 classes differ in mean; at s = 1 every class has mean 0 and they
  differ only in the direction u_c and radius r_c of their two modes.

Bayes least-squares floor, in the units of ``study.objectives.least_squares``
(mean per element):

    E||y - E[y|x]||^2 / dy = (mean_c r_c^2 + dy sigma_y^2) / dy,

independent of s (shrinking the means moves E[y|x] with them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ToyConfig", "ToyTask", "Batch"]


@dataclass(frozen=True)
class ToyConfig:
    n_classes: int = 4
    dx: int = 64  # context dim: d_signal class coordinates + distractors
    d_signal: int = 2  # class prototypes live on a circle in this plane
    signal_scale: float = 1.0  # radius a of the prototype circle
    distractor_std: float = 2.0  # sigma_d: larger than the signal, so random projections lose it
    dy: int = 8  # target dim; needs dy >= 2 C for separate mean and mode directions
    mean_scale: float = 2.0  # |m_c| at s = 0
    radius_min: float = 1.0  # mode radii r_c spread over [radius_min, radius_max]
    radius_max: float = 2.0
    y_noise: float = 0.1  # sigma_y
    task_seed: int = 0  # fixes R, m_c, u_c (the task), not the training seed

    def __post_init__(self) -> None:
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.d_signal < 2 or self.d_signal >= self.dx:
            raise ValueError(f"d_signal must be in [2, dx), got {self.d_signal} with dx={self.dx}")
        if self.dy < 2 * self.n_classes:
            raise ValueError(f"dy must be >= 2 * n_classes = {2 * self.n_classes}, got {self.dy}")


@dataclass
class Batch:
    x: Tensor  # [N, dx]
    y: Tensor  # [N, dy]
    c: Tensor  # [N] int64


def _check_strength(s: float) -> None:
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"mask strength s must be in [0, 1], got {s}")


class ToyTask:
    """One fixed task (rotation, means, mode directions); sample it at any mask strength."""

    def __init__(self, config: ToyConfig | None = None) -> None:
        self.config = cfg = config or ToyConfig()
        g = torch.Generator().manual_seed(cfg.task_seed)
        # Random rotation of the context space (QR of a Gaussian matrix).
        self.rotation, _ = torch.linalg.qr(torch.randn(cfg.dx, cfg.dx, generator=g))  # [dx, dx]
        angles = 2 * math.pi * torch.arange(cfg.n_classes, dtype=torch.float32) / cfg.n_classes
        proto = torch.zeros(cfg.n_classes, cfg.d_signal)
        proto[:, 0], proto[:, 1] = angles.cos(), angles.sin()
        self.prototypes = cfg.signal_scale * proto  # [C, d_signal]
        # Orthonormal directions in y: the first C carry the modes, the next C the means.
        basis, _ = torch.linalg.qr(torch.randn(cfg.dy, cfg.dy, generator=g))  # [dy, dy]
        self.mode_dirs = basis[:, : cfg.n_classes].t().contiguous()  # u_c, [C, dy]
        self.means = cfg.mean_scale * basis[:, cfg.n_classes : 2 * cfg.n_classes].t().contiguous()  # m_c, [C, dy]
        self.radii = torch.linspace(cfg.radius_min, cfg.radius_max, cfg.n_classes)  # r_c, [C]

    # ---- analytic quantities -------------------------------------------------
    def class_means(self, s: float) -> Tensor:
        """E[y | c] = (1 - s) m_c, shape [C, dy]."""
        _check_strength(s)
        return (1.0 - s) * self.means

    def bayes_floor(self, s: float = 1.0) -> float:
        """min_f E||f(x) - y||^2 / dy, attained by f(x) = E[y|x]; same for every s."""
        _check_strength(s)
        cfg = self.config
        return float((self.radii.pow(2).mean() + cfg.dy * cfg.y_noise**2) / cfg.dy)

    # ---- sampling -----------------------------------------------------------
    def sample_classes(self, n: int, generator: torch.Generator, balanced: bool = False) -> Tensor:
        """[n] class labels: i.i.d. uniform, or (balanced) each class n / C times."""
        C = self.config.n_classes
        if balanced:
            if n % C:
                raise ValueError(f"a balanced sample needs n divisible by {C}, got {n}")
            return torch.arange(C).repeat_interleave(n // C)
        return torch.randint(C, (n,), generator=generator)

    def sample_x(self, c: Tensor, generator: torch.Generator) -> Tensor:
        cfg = self.config
        noise = cfg.distractor_std * torch.randn(len(c), cfg.dx - cfg.d_signal, generator=generator)
        raw = torch.cat([self.prototypes[c], noise], dim=1)  # [N, dx]: signal plane first
        return raw @ self.rotation.t()  # [N, dx]

    def sample_y(self, c: Tensor, s: float, generator: torch.Generator) -> Tensor:
        cfg = self.config
        sign = torch.randint(2, (len(c),), generator=generator).float() * 2 - 1  # [N], +-1
        modes = sign[:, None] * self.radii[c, None] * self.mode_dirs[c]  # [N, dy]
        noise = cfg.y_noise * torch.randn(len(c), cfg.dy, generator=generator)
        return self.class_means(s)[c] + modes + noise  # [N, dy]

    def sample(self, n: int, s: float, generator: torch.Generator, balanced: bool = False) -> Batch:
        _check_strength(s)
        c = self.sample_classes(n, generator, balanced)
        return Batch(x=self.sample_x(c, generator), y=self.sample_y(c, s, generator), c=c)
