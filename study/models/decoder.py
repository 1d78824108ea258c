"""MAE decoder with a noise input, split at the block where the noise enters.

Names follow the published MAE (``decoder_embed``, ``mask_token``, ``decoder_blocks``,
...). The decoder is two calls so that cIMLE's k samples share everything before the
noise: ``prefix(latent, ids_restore)`` embeds the tokens and runs blocks ``0 .. j-1``
once per step; ``suffix(hidden, z, mask)`` injects ``z`` and runs the rest once per
sample batch (``torch.func.vmap`` over ``z`` works). Where and how ``z`` enters is one
module chosen from :class:`NoiseConfig`: :class:`AddNoise` or :class:`AdaLNNoise` at
block ``noise.block``, or :class:`TokenHead` in place of ``decoder_pred``. Image-scope
noise is ``z [B, dim]``, token-scope ``z [B, N_mask, dim]`` in ascending patch order;
it reaches masked positions only.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.models.vision_transformer import Block

from study.config import NoiseConfig
from study.models.attention import Attention
from study.models.encoder import _layer_norm, init_mae_weights, position_embedding

__all__ = ["MAEDecoder", "DecoderBlock", "AddNoise", "AdaLNNoise", "TokenHead", "masked_rank"]

Modulation = tuple[Tensor, ...]  # (shift, scale) pairs, each broadcastable to [B, 1+N, Dd]


class DecoderBlock(Block):
    """timm ``Block`` whose LayerNorms can be modulated: ``forward(x, mod)``.

    ``mod``: None, or ``(shift1, scale1, shift2, scale2)``, each broadcastable
    to ``x [B, 1+N, Dd]``; ``norm(x) * (1 + scale) + shift``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True,
                         norm_layer=_layer_norm, attn_layer=Attention)

    def forward(self, x: Tensor, mod: Modulation | None = None) -> Tensor:
        if mod is None:
            return super().forward(x)
        shift1, scale1, shift2, scale2 = mod
        h = self.norm1(x) * (1 + scale1) + shift1  # [B, 1+N, Dd]
        x = x + self.drop_path1(self.ls1(self.attn(h)))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + self.drop_path2(self.ls2(self.mlp(h)))  # [B, 1+N, Dd]

    def forward_at(self, x: Tensor, rows: Tensor, mod: Modulation | None = None) -> Tensor:
        """The output at tokens ``rows [B, M]`` only, ``[B, M, Dd]``: ``forward(x, mod)`` there, up to rounding
        (keys and values from every token; queries, the MLP and the rest at ``rows``)."""
        h = self.norm1(x)
        if mod is not None:
            h = h * (1 + mod[1]) + mod[0]  # [B, 1+N, Dd]
        x = at_rows(x, rows) + self.drop_path1(self.ls1(self.attn.forward_queries(h, rows)))  # [B, M, Dd]
        h = self.norm2(x)
        if mod is not None:
            h = h * (1 + at_rows(mod[3], rows)) + at_rows(mod[2], rows)
        return x + self.drop_path2(self.ls2(self.mlp(h)))  # [B, M, Dd]


def at_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """``x [B, T, W]`` at tokens ``rows [B, M]``: ``[B, M, W]``; ``x [B, 1, W]`` (one value for every token)
    and ``rows=None`` (every token) return ``x`` as it is."""
    return x if rows is None or x.shape[1] == 1 else x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def masked_rank(mask: Tensor) -> Tensor:
    """``[B, N]`` bool -> ``[B, N]`` long: rank of each masked patch among the masked ones of its row
    (ascending patch order), 0 at visible patches. Rows must mask equally many patches."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)  # [B, N]


def spread(values: Tensor, mask: Tensor) -> Tensor:
    """Per-token values ``[B, N_mask, W]`` -> ``[B, 1+N, W]`` at the masked positions, 0 elsewhere."""
    rank = masked_rank(mask)  # [B, N]
    out = torch.gather(values, 1, rank[..., None].expand(-1, -1, values.shape[-1]))  # [B, N, W]
    out = out * mask[..., None].to(out.dtype)  # [B, N, W]
    return F.pad(out, (0, 0, 1, 0))  # [B, 1+N, W] zero at cls


class AddNoise(nn.Linear):
    """``Linear(dim, Dd, bias=False)(z)`` added to the masked positions' hidden states (image scope: the
    same vector on every masked position)."""

    def __init__(self, noise: NoiseConfig, width: int) -> None:
        super().__init__(noise.dim, width, bias=False)
        nn.init.xavier_uniform_(self.weight)
        self.token = noise.scope == "token"

    def forward(self, x: Tensor, z: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        delta = super().forward(z)  # [B, Dd] | [B, N_mask, Dd]
        if self.token:
            delta = spread(delta, mask)  # [B, 1+N, Dd]
        else:
            delta = F.pad(mask.to(x.dtype), (1, 0))[..., None] * delta[:, None, :]  # [B, 1+N, Dd]
        return x + delta, None


class AdaLNNoise(nn.ModuleList):
    """``z`` sets a shift and scale (zero-initialised linear maps) of every LayerNorm from the noise block
    on, ``decoder_norm`` included: one map per block (4 vectors) and one for ``decoder_norm`` (2). Image
    scope modulates every token, token scope only the masked positions."""

    def __init__(self, noise: NoiseConfig, width: int, blocks: int) -> None:
        super().__init__(nn.Linear(noise.dim, w) for w in [4 * width] * blocks + [2 * width])
        for lin in self:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.token = noise.scope == "token"

    def forward(self, x: Tensor, z: Tensor, mask: Tensor) -> tuple[Tensor, list[Modulation]]:
        mods = []
        for lin in self:
            m = lin(z)  # [B, W] | [B, N_mask, W]
            m = spread(m, mask) if self.token else m[:, None, :]  # [B, 1+N | 1, W]
            mods.append(tuple(m.chunk(m.shape[-1] // x.shape[-1], dim=-1)))
        return x, mods


class LinearPredictor(nn.Linear):
    """MAE's ``decoder_pred``: ``[B, 1+N, Dd] -> [B, N, p*p*C]``, the class token dropped (``cls_first=False``:
    ``x [B, M, Dd]`` holds patch tokens only)."""

    def forward(self, x: Tensor, z: Tensor | None, mask: Tensor, cls_first: bool = True) -> Tensor:
        return super().forward(x)[:, 1:] if cls_first else super().forward(x)


class TokenHead(nn.Sequential):
    """Token-wise MLP head ``cat(x_token, z_token) -> p*p*C`` (hidden width ``mlp_ratio * Dd``), z at masked
    tokens only. A token's output depends on its own noise alone, which makes per-token cIMLE selection
    exact. Without noise (least squares on the same model) it is fed ``z = 0``, the noise mean."""

    def __init__(self, width: int, noise_dim: int, hidden: int, patch_dim: int, token: bool) -> None:
        super().__init__(nn.Linear(width + noise_dim, hidden), nn.GELU(), nn.Linear(hidden, patch_dim))
        self.noise_dim = noise_dim
        self.token = token

    def forward(self, x: Tensor, z: Tensor | None, mask: Tensor) -> Tensor:
        x = x[:, 1:]  # [B, N, Dd]
        if z is None:
            noise = x.new_zeros(*x.shape[:2], self.noise_dim)  # [B, N, dz]
        elif self.token:
            noise = spread(z, mask)[:, 1:]  # [B, N, dz], 0 at visible tokens
        else:
            noise = mask.to(x.dtype)[..., None] * z[:, None, :]  # [B, N, dz]
        return super().forward(torch.cat([x, noise], dim=-1))  # [B, N, p*p*C]

    def sampler(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``x [B, M, Dd]`` (the masked tokens) -> ``decode(z) -> [B, M, p*p*C]`` for ``z [B, M, dz]`` (token
        scope) or ``[B, dz]`` (image scope), or ``[c, B, ...]`` for ``z [c, B, ...]``. The first layer splits as ``W_x x + W_z z + b``; the part that
        reads ``x`` (Dd of its Dd + dz inputs) is computed here, once for every sample of ``z``."""
        first, act, second = self
        w_x, w_z = first.weight.split([x.shape[-1], self.noise_dim], dim=1)
        shared = F.linear(x, w_x, first.bias)  # [B, M, hidden]

        def decode(z: Tensor) -> Tensor:  # also z [c, B, ...]: c samples at once, broadcast against shared
            noise = F.linear(z.to(shared.dtype), w_z)  # [..., B, M, hidden] | [..., B, hidden]
            return second(act(shared + (noise if self.token else noise.unsqueeze(-2))))  # [..., B, M, p*p*C]

        return decode


class MAEDecoder(nn.Module):
    """Light transformer decoder over all tokens; optional noise ``z`` entering at block ``noise.block``.

    ``head_noise_dim``: end in a :class:`TokenHead` of this noise width (set with ``noise.block = "head"``,
    and for a noise-free decoder that shares the head's architecture)."""

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
        in_head = noise is not None and noise.block == "head"
        if noise is not None and not in_head and not 0 <= noise.block <= depth:
            raise ValueError(f"noise.block must be 'head' or in [0, decoder depth={depth}], got {noise.block}")
        if in_head and head_noise_dim != noise.dim:
            raise ValueError(f"noise in the head needs head_noise_dim = noise.dim ({noise.dim}), got {head_noise_dim}")
        self.num_patches = num_patches
        self.noise = noise
        # where the split prefix | suffix falls; without noise (or noise in the head) all blocks are prefix
        self.split = depth if noise is None or in_head else noise.block

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))  # [1, 1, Dd]
        self.decoder_pos_embed = position_embedding(decoder_dim, grid_size, pos_embed)  # [1, 1+N, Dd]
        self.decoder_blocks = nn.ModuleList(DecoderBlock(decoder_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.decoder_norm = _layer_norm(decoder_dim)
        # the state-dict names of MAE (decoder_pred) and of the head (decoder_head) are kept apart
        self.decoder_pred = self.decoder_head = None
        if head_noise_dim is None:
            self.decoder_pred = LinearPredictor(decoder_dim, patch_dim)
        else:
            token = noise is not None and noise.scope == "token"
            self.decoder_head = TokenHead(decoder_dim, head_noise_dim, int(mlp_ratio * decoder_dim), patch_dim, token)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_mae_weights)

        # noise modules last, so that a decoder with and without noise draws the
        # same initial weights for everything else from the same seed
        self.decoder_noise_proj = self.decoder_noise_mod = None
        if noise is not None and not in_head:
            if noise.injection == "add":
                self.decoder_noise_proj = AddNoise(noise, decoder_dim)
            elif noise.injection == "adaln":
                self.decoder_noise_mod = AdaLNNoise(noise, decoder_dim, depth - noise.block)
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

    def suffix(self, hidden: Tensor, z: Tensor | None, mask: Tensor) -> Tensor:
        """``hidden [B, 1+N, Dd]``, ``z [B, dim] | [B, N_mask, dim] | None``, ``mask [B, N]`` (True = masked)
        -> ``pred [B, N, p*p*C]``. ``z=None``: no noise (least squares)."""
        x = self._blocks_after_noise(hidden, z, mask)  # [B, 1+N, Dd]
        predict = self.decoder_head if self.decoder_pred is None else self.decoder_pred
        return predict(x, z, mask)  # [B, N, p*p*C]

    def masked_sampler(self, hidden: Tensor, mask: Tensor, masked: Tensor) -> Callable[[Tensor], Tensor]:
        """``decode(z) -> pred [B, N_mask, p*p*C]`` at the masked patches only (``masked [B, N_mask]``, their
        indices), for objectives that decode many ``z`` from one ``hidden``: what does not depend on ``z``
        is done here, once. Equal to ``suffix(hidden, z, mask)`` at the masked rows, up to float rounding.
        With the noise in the head, that is the norm and the part of the head's first layer that reads
        the decoder features. With the noise at a block, each ``z`` runs the blocks from there on, the
        last of them with queries (and its MLP, the norm and the prediction) at the masked patches only."""
        self._checked_has_noise()
        if self.decoder_head is not None:  # the noise enters in the head: no block after the split
            return self.decoder_head.sampler(self._blocks_after_noise(hidden, None, mask, masked))
        return lambda z: self.decoder_pred(self._blocks_after_noise(hidden, z, mask, masked), z, mask, cls_first=False)

    def folded_sampler(self, hidden: Tensor, mask: Tensor, masked: Tensor) -> Callable[[Tensor], Tensor]:
        """``decode(z [c, B, ...]) -> [c, B, N_mask, p*p*C]``: :meth:`masked_sampler` of c samples in one call,
        the samples folded into the batch (``hidden``, ``mask`` and ``masked`` repeated c times, sample-major),
        so that the blocks are ordinary batched modules: fused attention kernels and autocast apply, which
        ``torch.func.vmap`` over :meth:`masked_sampler` does not give."""
        if self.decoder_head is not None:  # the head broadcasts its shared part against the samples itself
            return self.masked_sampler(hidden, mask, masked)

        def decode(z: Tensor) -> Tensor:
            c = z.shape[0]
            hidden_c, mask_c, masked_c = (t.expand(c, *t.shape).flatten(0, 1) for t in (hidden, mask, masked))
            return self.masked_sampler(hidden_c, mask_c, masked_c)(z.flatten(0, 1)).unflatten(0, (c, -1))

        return decode

    def sample_bytes(self, batch: int, num_masked: int, itemsize: int = 4) -> int:
        """About the most memory one more sample of :meth:`folded_sampler` holds at once without gradient: its
        copy of ``hidden``, the noise modulations, and one block's widest activations (qkv, attention scores
        as a non-fused kernel keeps them, the MLP); with the noise in the head, the head's hidden layer."""
        dim, tokens = self.decoder_embed.out_features, self.num_patches + 1
        blocks = self.decoder_blocks[self.split:]
        if not blocks:
            width = self.decoder_head[0].out_features if self.decoder_head is not None else dim
            return batch * num_masked * 2 * width * itemsize
        heads, mlp = blocks[0].attn.num_heads, blocks[0].mlp.fc1.out_features
        per_block = tokens * (6 * dim + heads * tokens + mlp)
        modulations = 6 * tokens * dim * len(blocks) if self.decoder_noise_mod is not None else 0
        return batch * (tokens * dim + modulations + per_block) * itemsize

    def _blocks_after_noise(self, hidden: Tensor, z: Tensor | None, mask: Tensor,
                            masked: Tensor | None = None) -> Tensor:
        """Inject ``z`` (unless it enters in the head), run blocks ``split ..``, norm: ``[B, 1+N, Dd]``; given
        ``masked [B, N_mask]``, ``[B, N_mask, Dd]`` at those patches only (from the last block on)."""
        x, mods = hidden, None
        if z is not None:
            z = self._checked(z, mask).to(x.dtype)
            inject = self.decoder_noise_mod if self.decoder_noise_proj is None else self.decoder_noise_proj
            if inject is not None:  # None: the noise enters in the head
                x, mods = inject(x, z, mask)
        blocks = self.decoder_blocks[self.split:]
        mods = mods or [None] * (len(blocks) + 1)
        rows = None if masked is None else masked + 1  # token indices: the class token is token 0
        for i, (blk, mod) in enumerate(zip(blocks, mods)):
            x = blk.forward_at(x, rows, mod) if rows is not None and i == len(blocks) - 1 else blk(x, mod)
        if not blocks:
            x = at_rows(x, rows)  # [B, N_mask, Dd]
        x = self.decoder_norm(x)
        if mods[-1] is not None:
            shift, scale = mods[-1]
            x = x * (1 + at_rows(scale, rows)) + at_rows(shift, rows)
        return x

    def _checked_has_noise(self) -> None:
        if self.noise is None:
            raise ValueError("this decoder was built without noise (objective 'ls'); pass z=None")

    def _checked(self, z: Tensor, mask: Tensor) -> Tensor:
        self._checked_has_noise()
        # the number of masked tokens is not checked here (it would cost a device sync)
        ndim = 2 if self.noise.scope == "image" else 3
        if z.ndim != ndim or z.shape[0] != mask.shape[0] or z.shape[-1] != self.noise.dim:
            want = "[B, dim]" if ndim == 2 else "[B, N_mask, dim]"
            raise ValueError(
                f"z has shape {tuple(z.shape)}, expected {want} with B={mask.shape[0]}, dim={self.noise.dim} "
                f"(noise scope {self.noise.scope!r})"
            )
        return z
