"""Synthetic conditionals that share their mean but differ in multimodality.

    c ~ Uniform{0..C-1},  v ~ Uniform{0..V-1}  (an auxiliary label, independent of c)
    x = R [a p_c ; a q_v ; sigma_d n]                                  context, [dx]
    y = (1 - s) m_c + n_v + b r_c u_c + sigma_y e,   b = +-1           target, [dy]

x determines c and v exactly, so E[y | x] = (1 - s) m_c + n_v: the two modes
+-r_c u_c average out, and at mask strength s = 1 the classes share their mean and
differ only in their modes. The class prototypes ``p_c`` are linearly separable but
hidden by a random rotation among wider distractor coordinates, so a random encoder
probes near chance and a learned one exactly. ``v`` moves y's mean at every s, so a
least-squares encoder has another use for its capacity when the class stops paying,
which makes the collapse in s gradual rather than a knife edge. The Bayes floor,
(mean_c r_c^2 + dy sigma_y^2) / dy per element, does not depend on s or v.
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
    d_signal: int = 2  # class prototypes live on a circle in this plane (v's on a second one)
    signal_scale: float = 1.0  # radius a of the prototype circles
    distractor_std: float = 2.0  # sigma_d: larger than the signal, so random projections lose it
    n_aux: int = 4  # V, values of the auxiliary label v
    aux_scale: float = 1.0  # |n_v|: how much v moves the mean of y
    dy: int = 12  # target dim; needs dy >= C + 1 + V for separate mode, mean and v directions
    # m_c at s = 0 lie on one line, with gaps between neighbouring classes growing geometrically from
    # mean_gap by mean_gap_ratio: class pairs differ in their means by different amounts, so least
    # squares stops paying for them at different s (a graded collapse instead of a knife edge)
    mean_gap: float = 1.0
    mean_gap_ratio: float = 2.5
    radius_min: float = 1.0  # mode radii r_c spread over [radius_min, radius_max]
    radius_max: float = 2.0
    y_noise: float = 0.1  # sigma_y
    task_seed: int = 0  # fixes R, m_c, u_c (the task), not the training seed

    def __post_init__(self) -> None:
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.mean_gap <= 0 or self.mean_gap_ratio < 1:
            raise ValueError(f"need mean_gap > 0 and mean_gap_ratio >= 1, got {self.mean_gap}, {self.mean_gap_ratio}")
        if self.n_aux < 1:
            raise ValueError(f"n_aux must be >= 1, got {self.n_aux}")
        if self.d_signal < 2 or 2 * self.d_signal >= self.dx:
            raise ValueError(f"d_signal must be in [2, dx / 2), got {self.d_signal} with dx={self.dx}")
        if self.dy < self.n_classes + 1 + self.n_aux:
            raise ValueError(f"dy must be >= n_classes + 1 + n_aux = {self.n_classes + 1 + self.n_aux}, "
                             f"got {self.dy}")


@dataclass
class Batch:
    x: Tensor  # [N, dx]
    y: Tensor  # [N, dy]
    c: Tensor  # [N] int64
    v: Tensor  # [N] int64, the auxiliary label


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
        self.prototypes = cfg.signal_scale * _circle(cfg.n_classes, cfg.d_signal)  # [C, d_signal]
        self.aux_prototypes = cfg.signal_scale * _circle(cfg.n_aux, cfg.d_signal)  # [V, d_signal]
        # Orthonormal directions in y: the first C carry the modes, the next one the means, then V for v's shifts.
        basis, _ = torch.linalg.qr(torch.randn(cfg.dy, cfg.dy, generator=g))  # [dy, dy]
        C = cfg.n_classes
        self.mode_dirs = basis[:, :C].t().contiguous()  # u_c, [C, dy]
        gaps = cfg.mean_gap * cfg.mean_gap_ratio ** torch.arange(C - 1, dtype=torch.float32)  # [C-1]
        positions = torch.cat([torch.zeros(1), gaps.cumsum(0)])
        self.mean_positions = positions - positions.mean()  # [C], centred: the classes' common mean is 0
        self.means = self.mean_positions[:, None] * basis[:, C]  # m_c, [C, dy], along one direction
        self.aux_means = cfg.aux_scale * basis[:, C + 1 : C + 1 + cfg.n_aux].t().contiguous()  # n_v, [V, dy]
        self.radii = torch.linspace(cfg.radius_min, cfg.radius_max, cfg.n_classes)  # r_c, [C]

    # ---- analytic quantities -------------------------------------------------
    def class_means(self, s: float) -> Tensor:
        """E[y | c] = (1 - s) m_c, shape [C, dy]."""
        _check_strength(s)
        return (1.0 - s) * self.means

    def conditional_mean(self, batch: "Batch", s: float) -> Tensor:
        """E[y | x] = (1 - s) m_c + n_v, shape [N, dy] (x names c and v exactly)."""
        return self.class_means(s)[batch.c] + self.aux_means[batch.v]

    def nearest_mode_class(self, y: Tensor, v: Tensor, s: float, amplitude: float = 1.0) -> Tensor:
        """``[N]``: the class whose mode ``(1 - s) m_c + n_v +- amplitude r_c u_c`` lies nearest to each row
        of ``y [N, dy]`` (given each row's ``v``): which class a sample names. ``amplitude`` < 1 judges
        against modes drawn in towards the class centre."""
        signs = amplitude * torch.tensor([1.0, -1.0])
        modes = self.class_means(s)[:, None] + signs[None, :, None] * self.radii[:, None, None] * self.mode_dirs[:, None]
        centres = modes[None] + self.aux_means[v][:, None, None]  # [N, C, 2, dy]
        dist = (centres - y[:, None, None]).pow(2).sum(-1).flatten(1)  # [N, 2C]
        return dist.argmin(1) // 2

    def axis_class(self, y: Tensor, v: Tensor, s: float) -> Tensor:
        """``[N]``: the class whose mode axis, the line ``(1 - s) m_c + n_v + t u_c`` through both its modes,
        lies nearest to each row of ``y [N, dy]`` (given each row's ``v``): which class a sample names,
        however far out along the line it lies. At s = 1 every axis passes through ``n_v`` and this is the
        largest |cos| between the offset from ``n_v`` and ``u_c``. A sample without the class (the mean, a
        class mixture) lands on each axis by chance; against the same blur, a class whose samples lie
        further out along its axis is named more reliably."""
        offsets = y[:, None] - self.class_means(s)[None] - self.aux_means[v][:, None]  # [N, C, dy]
        along = (offsets * self.mode_dirs[None]).sum(-1)  # [N, C]
        return (offsets.pow(2).sum(-1) - along.pow(2)).argmin(1)  # squared distance to each axis

    def mode_amplitude(self, y: Tensor, v: Tensor, c: Tensor, s: float) -> Tensor:
        """``[N]``: |<y - (1 - s) m_c - n_v, u_c>| / r_c, how far out along its class's axis each row lies
        (the class's modes: 1; its centre: 0)."""
        offsets = y - self.class_means(s)[c] - self.aux_means[v]  # [N, dy]
        return (offsets * self.mode_dirs[c]).sum(-1).abs() / self.radii[c]

    def judge(self, y: Tensor, v: Tensor, c: int, s: float) -> dict[str, Tensor]:
        """How class ``c``'s samples ``y [N, dy]`` (given each row's ``v``) name their class, as 0-dim
        tensors: the fraction nearest a true mode of ``c`` (``mode_accuracy``), the fraction nearest its mode
        axis (``axis_accuracy``) and how far out along that axis they lie (``amplitude``)."""
        labels = torch.full((len(y),), c, dtype=torch.long)
        return {"mode_accuracy": (self.nearest_mode_class(y, v, s) == c).float().mean(),
                "axis_accuracy": (self.axis_class(y, v, s) == c).float().mean(),
                "amplitude": self.mode_amplitude(y, v, labels, s).mean()}

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

    def sample_aux(self, n: int, generator: torch.Generator) -> Tensor:
        """[n] auxiliary labels v, i.i.d. uniform."""
        return torch.randint(self.config.n_aux, (n,), generator=generator)

    def sample_x(self, c: Tensor, v: Tensor, generator: torch.Generator) -> Tensor:
        cfg = self.config
        noise = cfg.distractor_std * torch.randn(len(c), cfg.dx - 2 * cfg.d_signal, generator=generator)
        raw = torch.cat([self.prototypes[c], self.aux_prototypes[v], noise], dim=1)  # [N, dx]: signal planes first
        return raw @ self.rotation.t()  # [N, dx]

    def sample_y(self, c: Tensor, v: Tensor, s: float, generator: torch.Generator) -> Tensor:
        cfg = self.config
        sign = torch.randint(2, (len(c),), generator=generator).float() * 2 - 1  # [N], +-1
        modes = sign[:, None] * self.radii[c, None] * self.mode_dirs[c]  # [N, dy]
        noise = cfg.y_noise * torch.randn(len(c), cfg.dy, generator=generator)
        return self.class_means(s)[c] + self.aux_means[v] + modes + noise  # [N, dy]

    def sample(self, n: int, s: float, generator: torch.Generator, balanced: bool = False) -> Batch:
        _check_strength(s)
        c = self.sample_classes(n, generator, balanced)
        v = self.sample_aux(n, generator)
        return Batch(x=self.sample_x(c, v, generator), y=self.sample_y(c, v, s, generator), c=c, v=v)


def _circle(n: int, dim: int) -> Tensor:
    """n points evenly on the unit circle in the first two of ``dim`` coordinates: [n, dim]."""
    angles = 2 * math.pi * torch.arange(n, dtype=torch.float32) / n
    points = torch.zeros(n, dim)
    points[:, 0], points[:, 1] = angles.cos(), angles.sin()
    return points
