"""The toy's encoder h(x) and noise-conditioned decoder f(h, z).

Both objectives train the same two MLPs: cIMLE feeds z ~ N(0, I), least squares
z = 0, the deterministic conditional-mean predictor through the same weights. The
representation is a noisy channel of fixed power (layer norm without affine, then
``h + channel_noise * eps``). A clean code of unbounded precision carries any trace
of the class for free, so least squares' probe would collapse only at s = 1 exactly;
with a power budget the class competes with the auxiliary label v, and its share
falls with its least-squares value (1 - s)^2 |m_c - m_c'|^2, while cIMLE's value of
the class (which mode to sample) does not fall with s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mlp", "Encoder", "Decoder", "channel"]


def mlp(d_in: int, width: int, depth: int, d_out: int) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` with GELU, then a linear output."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.GELU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x [B, dx] -> representation h [B, dh]: an MLP, then layer norm without affine (fixed power)."""

    def __init__(self, dx: int, dh: int, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.net = mlp(dx, width, depth, dh)
        self.norm = nn.LayerNorm(dh, elementwise_affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.net(x))


def channel(h: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """What the decoder and the probe receive: ``h + std * eps``, eps ~ N(0, I) from ``generator``."""
    if std == 0:
        return h
    return h + std * torch.randn(h.shape, generator=generator, dtype=h.dtype)


class Decoder(nn.Module):
    """(h [B, dh], z [B, dz]) -> y [B, dy]; noise enters by concatenation with h."""

    def __init__(self, dh: int, dz: int, dy: int, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.dz = dz
        self.net = mlp(dh + dz, width, depth, dy)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        return self.net(torch.cat([h, z], dim=-1))

    def mean_input(self, h: Tensor) -> Tensor:
        """f(h, 0): the least-squares predictor."""
        return self.forward(h, h.new_zeros(*h.shape[:-1], self.dz))
