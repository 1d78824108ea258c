"""MAE decoder with a noise input, split at the block where the noise enters.

Names follow the published MAE: ``decoder_embed``, ``mask_token``,
``decoder_pos_embed`` (fixed sin-cos), ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``. Noise modules, when the decoder takes noise, are
``decoder_noise_proj`` ("add") or ``decoder_noise_mod`` ("adaln").

The decoder is two calls so that cIMLE's k samples share everything before the
noise:

* ``prefix(latent, ids_restore) -> hidden [B, 1+N, Dd]``: embed the encoder's
  tokens, put the mask token at every masked position, add position
  embeddings, run blocks ``0 .. j-1``. Runs once per step.
* ``suffix(hidden, z, mask) -> pred [B, N, p*p*C]``: inject ``z``, run blocks
  ``j ..``, norm, predict, drop the class token. Runs once per sample batch;
  it is written so that ``torch.func.vmap`` over ``z`` works.

Noise (``NoiseConfig``): ``scope="image"``: ``z [B, dim]``; ``scope="token"``:
``z [B, N_mask, dim]``, row i for the i-th masked patch in ascending patch
order. ``injection="add"``: ``Linear(dim, Dd, bias=False)(z)`` is added to the
masked positions' hidden states at block j (image scope: the same vector on
every masked position). ``injection="adaln"``: ``z`` sets a shift and scale
(zero-initialised linear maps) of every LayerNorm from block j on, including
``decoder_norm``; image scope modulates every token, token scope only the
masked positions. ``block == depth`` puts the noise right before
``decoder_norm`` / ``decoder_pred``.

``block == "head"``: the decoder ends in a token-wise MLP head,
``decoder_head(cat(decoder_norm(x), z))`` (hidden width ``mlp_ratio * Dd``), in
place of the linear ``decoder_pred``; ``injection`` does not apply. A token's
output then depends on its own noise only, which makes per-token (factorised)
cIMLE selection exact, and the k samples cost k head passes. A decoder built
with ``head_noise_dim`` but no noise (least squares on the same model) feeds
``z = 0`` to the same head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.models.vision_transformer import Block

from study.config import NoiseConfig
from study.models.attention import Attention
from study.models.encoder import _layer_norm, init_mae_weights, position_embedding

__all__ = ["MAEDecoder", "DecoderBlock", "masked_rank"]

class DecoderBlock(Block):
    """timm ``Block`` whose LayerNorms can be modulated: ``forward(x, mod)``.

    ``mod``: None, or ``(shift1, scale1, shift2, scale2)``, each broadcastable
    to ``x [B, 1+N, Dd]``; ``norm(x) * (1 + scale) + shift``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True,
                         norm_layer=_layer_norm, attn_layer=Attention)

    def forward(self, x: Tensor, mod: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
        if mod is None:
            return super().forward(x)
        shift1, scale1, shift2, scale2 = mod
        h = self.norm1(x) * (1 + scale1) + shift1  # [B, 1+N, Dd]
        x = x + self.drop_path1(self.ls1(self.attn(h)))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + self.drop_path2(self.ls2(self.mlp(h)))  # [B, 1+N, Dd]


def masked_rank(mask: Tensor) -> Tensor:
    """``[B, N]`` bool -> ``[B, N]`` long: rank of each masked patch among the masked ones of its row
    (ascending patch order), 0 at visible patches. Rows must mask equally many patches."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # [B, N]


class MAEDecoder(nn.Module):
    """Light transformer decoder over all tokens; optional noise ``z`` entering at block ``noise.block``."""

    def __init__(
        self,
        num_patches: int,
        grid_size: tuple[int, int],
        patch_dim: int,
        embed_dim: int,
        decoder_dim: int = 48,
        depth: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        noise: NoiseConfig | None = None,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        head_noise_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.depth = depth
        self.noise = noise
        if noise is not None and noise.block != "head" and not 0 <= noise.block <= depth:
            raise ValueError(f"noise.block must be 'head' or in [0, decoder depth={depth}], got {noise.block}")
        if noise is not None and noise.block == "head":
            head_noise_dim = noise.dim
        # the token-wise head's noise width (None: linear decoder_pred, no head)
        self.head_noise_dim = head_noise_dim
        # where the split prefix | suffix falls; without noise (or noise in the head) all blocks are prefix
        self.split = depth if noise is None or noise.block == "head" else noise.block

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))  # [1, 1, Dd]
        self.decoder_pos_embed = position_embedding(decoder_dim, grid_size, pos_embed)  # [1, 1+N, Dd]
        self.decoder_blocks = nn.ModuleList(DecoderBlock(decoder_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.decoder_norm = _layer_norm(decoder_dim)
        self.decoder_pred = None
        self.decoder_head = None
        if head_noise_dim is None:
            self.decoder_pred = nn.Linear(decoder_dim, patch_dim)
        else:
            hidden = int(mlp_ratio * decoder_dim)
            self.decoder_head = nn.Sequential(nn.Linear(decoder_dim + head_noise_dim, hidden), nn.GELU(),
                                              nn.Linear(hidden, patch_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_mae_weights)

        # noise modules last, so that a decoder with and without noise draws the
        # same initial weights for everything else from the same seed
        self.decoder_noise_proj = None
        self.decoder_noise_mod = None
        if noise is not None and noise.block != "head":
            if noise.injection == "add":
                self.decoder_noise_proj = nn.Linear(noise.dim, decoder_dim, bias=False)
                nn.init.xavier_uniform_(self.decoder_noise_proj.weight)
            elif noise.injection == "adaln":
                # one map per modulated block (4 vectors) and one for decoder_norm (2)
                widths = [4 * decoder_dim] * (depth - noise.block) + [2 * decoder_dim]
                self.decoder_noise_mod = nn.ModuleList(nn.Linear(noise.dim, w) for w in widths)
                for lin in self.decoder_noise_mod:
                    nn.init.zeros_(lin.weight)
                    nn.init.zeros_(lin.bias)
            else:
                raise ValueError(f"noise.injection must be 'add' or 'adaln', got {noise.injection!r}")

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "decoder_pos_embed"}

    def noise_shape(self, num_masked: int) -> tuple[int, ...]:
        """Shape of one example's ``z``: ``(dim,)`` or ``(N_mask, dim)``."""
        if self.noise is None:
            raise ValueError("this decoder takes no noise")
        return (self.noise.dim,) if self.noise.scope == "image" else (num_masked, self.noise.dim)

    # ------------------------------------------------------------------ passes

    def prefix(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """``latent [B, 1+N_vis, D]`` (cls first, visible in ``ids_keep`` order), ``ids_restore [B, N]``
        -> ``hidden [B, 1+N, Dd]`` after blocks ``0 .. split-1``."""
        x = self.decoder_embed(latent)  # [B, 1+N_vis, Dd]
        batch, length, dim = x.shape
        n = ids_restore.shape[1]
        fill = self.mask_token.to(x.dtype).expand(batch, n + 1 - length, dim)  # [B, N_mask, Dd]
        patches = torch.cat([x[:, 1:], fill], dim=1)  # [B, N, Dd] visible then masked
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, dim))  # [B, N, Dd] patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # [B, 1+N, Dd]
        for blk in self.decoder_blocks[: self.split]:
            x = blk(x)  # [B, 1+N, Dd]
        return x

    def _spread(self, values: Tensor, mask: Tensor) -> Tensor:
        """Per-token values ``[B, N_mask, W]`` -> ``[B, 1+N, W]`` at the masked positions, 0 elsewhere."""
        rank = masked_rank(mask)  # [B, N]
        out = torch.gather(values, 1, rank[..., None].expand(-1, -1, values.shape[-1]))  # [B, N, W]
        out = out * mask[..., None].to(out.dtype)  # [B, N, W]
        return F.pad(out, (0, 0, 1, 0))  # [B, 1+N, W] zero at cls

    def _check_z(self, z: Tensor, mask: Tensor) -> None:
        # the number of masked tokens is not checked here (it would cost a device sync)
        ndim = 2 if self.noise.scope == "image" else 3
        if z.ndim != ndim or z.shape[0] != mask.shape[0] or z.shape[-1] != self.noise.dim:
            want = "[B, dim]" if ndim == 2 else "[B, N_mask, dim]"
            raise ValueError(
                f"z has shape {tuple(z.shape)}, expected {want} with B={mask.shape[0]}, dim={self.noise.dim} "
                f"(noise scope {self.noise.scope!r})"
            )

    def suffix(self, hidden: Tensor, z: Tensor | None, mask: Tensor) -> Tensor:
        """``hidden [B, 1+N, Dd]``, ``z [B, dim] | [B, N_mask, dim] | None``, ``mask [B, N]`` (True = masked)
        -> ``pred [B, N, p*p*C]``. ``z=None``: no noise (least squares)."""
        if self.decoder_head is not None:
            return self._head(hidden, z, mask)
        x = hidden
        mods: list[Tensor | None] = [None] * (self.depth - self.split + 1)
        if z is not None:
            if self.noise is None:
                raise ValueError("this decoder was built without noise (objective 'ls'); pass z=None")
            self._check_z(z, mask)
            z = z.to(x.dtype)
            token = self.noise.scope == "token"
            if self.decoder_noise_proj is not None:  # add
                delta = self.decoder_noise_proj(z)  # [B, Dd] | [B, N_mask, Dd]
                if token:
                    delta = self._spread(delta, mask)  # [B, 1+N, Dd]
                else:
                    delta = F.pad(mask.to(x.dtype), (1, 0))[..., None] * delta[:, None, :]  # [B, 1+N, Dd]
                x = x + delta
            else:  # adaln
                mods = []
                for lin in self.decoder_noise_mod:
                    m = lin(z)  # [B, W] | [B, N_mask, W]
                    m = self._spread(m, mask) if token else m[:, None, :]  # [B, 1+N | 1, W]
                    mods.append(m)
        for i, blk in enumerate(self.decoder_blocks[self.split :]):
            m = mods[i]
            x = blk(x, None if m is None else tuple(m.chunk(4, dim=-1)))  # [B, 1+N, Dd]
        if mods[-1] is None:
            x = self.decoder_norm(x)
        else:
            shift, scale = mods[-1].chunk(2, dim=-1)
            x = self.decoder_norm(x) * (1 + scale) + shift  # [B, 1+N, Dd]
        return self.decoder_pred(x)[:, 1:]  # [B, N, p*p*C]

    def _head(self, hidden: Tensor, z: Tensor | None, mask: Tensor) -> Tensor:
        """Token-wise head: ``decoder_head(cat(decoder_norm(hidden), z_token))``; z only at masked tokens."""
        x = self.decoder_norm(hidden)[:, 1:]  # [B, N, Dd]
        if z is None:
            noise = x.new_zeros(*x.shape[:2], self.head_noise_dim)  # [B, N, dz]: the noise mean
        else:
            if self.noise is None:
                raise ValueError("this decoder was built without noise (objective 'ls'); pass z=None")
            self._check_z(z, mask)
            z = z.to(x.dtype)
            if self.noise.scope == "token":
                noise = self._spread(z, mask)[:, 1:]  # [B, N, dz], 0 at visible tokens
            else:
                noise = mask.to(x.dtype)[..., None] * z[:, None, :]  # [B, N, dz]
        return self.decoder_head(torch.cat([x, noise], dim=-1))  # [B, N, p*p*C]

    def forward(self, latent: Tensor, ids_restore: Tensor, z: Tensor | None, mask: Tensor) -> Tensor:
        return self.suffix(self.prefix(latent, ids_restore), z, mask)
