"""Fixed 2-D sine-cosine position embeddings (Vaswani et al. 2017, extended to a grid).

Layout matches the one used by published MAE checkpoints: the first half of the
channels encodes the patch's column, the second half its row; within each
half, sines then cosines at geometrically spaced frequencies. An optional
all-zero slot in front is the class token's position.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sincos_1d", "sincos_2d"]


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Embed 1-D positions ``[M]`` into ``[M, dim]`` (``dim`` even): sin | cos."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    freqs = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)  # [dim/2]
    freqs = 1.0 / 10000.0**freqs
    angles = positions.to(torch.float64).reshape(-1)[:, None] * freqs[None, :]  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # [M, dim]


def sincos_2d(dim: int, grid: int | tuple[int, int], cls_token: bool = False) -> Tensor:
    """Position embedding for a row-major ``grid`` of patches: ``[(1 +) H*W, dim]`` float32.

    ``dim`` must be divisible by 4 (two axes, sin and cos each).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be divisible by 4, got {dim}")
    h, w = (grid, grid) if isinstance(grid, int) else grid
    rows = torch.arange(h).repeat_interleave(w)  # [H*W] row index of patch n
    cols = torch.arange(w).repeat(h)  # [H*W] column index of patch n
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # [H*W, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # [1+H*W, dim]
    return emb.float()
