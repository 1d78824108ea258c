"""The Masked VAE's variational encoder (training only; discarded afterwards).

It "peeks" at the masked patches: its own patch embedding, fixed sin-cos
position embeddings, ``depth`` transformer blocks over the masked patches
only, then two linear heads give ``mu`` and ``logvar`` ``[B, N_mask, dim]``,
row i for the i-th masked patch in ascending patch order (the order the
decoder's token-scope noise uses). As in the paper it does not see the
visible patches: q(z | x_masked), matched to the N(0, I) prior that replaces
it at sampling time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from study.models.attention import Attention
from study.models.encoder import _layer_norm, init_mae_weights, init_patch_embed
from study.models.pos_embed import sincos_2d

__all__ = ["VariationalEncoder"]


class VariationalEncoder(nn.Module):
    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        latent_dim: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(
            sincos_2d(embed_dim, self.patch_embed.grid_size)[None], requires_grad=False
        )  # [1, N, D]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm, attn_layer=Attention)
            for _ in range(depth)
        )
        self.norm = _layer_norm(embed_dim)
        self.mu = nn.Linear(embed_dim, latent_dim)
        self.logvar = nn.Linear(embed_dim, latent_dim)
        init_patch_embed(self.patch_embed.proj)
        for name, module in self.named_modules():
            if name != "patch_embed.proj":
                init_mae_weights(module)
        # start at sigma = 1 so the first KL is small and the latent noisy
        nn.init.zeros_(self.logvar.weight)
        nn.init.zeros_(self.logvar.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, imgs: Tensor, ids_masked: Tensor) -> tuple[Tensor, Tensor]:
        """``imgs [B, C, H, W]``, ``ids_masked [B, N_mask]`` (ascending) -> ``mu, logvar [B, N_mask, dim]``."""
        x = self.patch_embed(imgs) + self.pos_embed  # [B, N, D]
        x = torch.gather(x, 1, ids_masked[..., None].expand(-1, -1, x.shape[-1]))  # [B, N_mask, D]
        for blk in self.blocks:
            x = blk(x)  # [B, N_mask, D]
        x = self.norm(x)
        return self.mu(x), self.logvar(x)  # [B, N_mask, dim] each
