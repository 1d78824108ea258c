"""The toy's encoder h(x) and noise-conditioned decoder f(h, z).

Both objectives train the same two MLPs. cIMLE feeds noise z ~ N(0, I); least
squares feeds z = 0, so its decoder is the deterministic map f(h, 0) (the
conditional-mean predictor LS is after) through exactly the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mlp", "Encoder", "Decoder"]


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
    """x [B, dx] -> representation h [B, dh] (linear last layer: the probe reads h)."""

    def __init__(self, dx: int, dh: int, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.net = mlp(dx, width, depth, dh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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
