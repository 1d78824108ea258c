"""The masked autoencoder: encoder, noisy decoder, and the objective that turns them into a loss.

``forward`` is three calls, whatever the objective: the encoder on the visible patches, the
decoder's shared part (``decoder.prefix``, the blocks before the noise), then
``objective.loss(model, context)``. Objectives live in :mod:`study.methods`, one module each
(``ls``, ``cimle``, ``mvae``); ``cfg.objective`` names one. An objective chooses the noise the decoder
takes and may add modules (the Masked VAE's variational encoder), registered here under their own
names so that checkpoints and exports keep them.

Masks: ``mask [B, N]`` bool, True = masked, row-major patch order, the same
number of masked patches in every row. Index tensors are derived here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from study.config import Config
from study.data.masking import MaskIndices, mask_indices
from study.methods import objective_class
from study.methods.base import Context, Objective, PretrainOutput, randn_like_on
from study.models.decoder import MAEDecoder
from study.models.encoder import ViTEncoder

__all__ = ["MaskedAutoencoder", "PretrainOutput", "MaskIndices", "mask_indices", "build_model", "NORM_PIX_EPS"]

NORM_PIX_EPS = 1e-6


class MaskedAutoencoder(nn.Module):
    """The pretraining model of a :class:`study.config.Config`: ViT encoder, MAE decoder, objective.

    ``vectorize``: decode cIMLE's samples through ``torch.func.vmap`` (True) or
    one call per sample (False); both give the same result.
    """

    def __init__(self, cfg: Config, *, vectorize: bool = True) -> None:
        super().__init__()
        m = cfg.model
        self.objective = cfg.objective
        self.method: Objective = objective_class(cfg.objective)(cfg)
        self.vectorize = vectorize
        self.patch_size = m.patch_size
        self.in_chans = m.in_chans
        self.norm_pix_loss = m.norm_pix_loss
        self.sign_flip = cfg.data.sign_flip

        self.encoder = ViTEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads,
                                  m.mlp_ratio, m.drop_path, m.pos_embed)
        self.num_patches = self.encoder.num_patches
        self.grid_size = tuple(self.encoder.patch_embed.grid_size)
        self.noise = self.method.decoder_noise()
        # with noise in the head, every objective gets the same head (least squares feeds it z = 0)
        head_dim = cfg.noise.dim if cfg.noise.block == "head" else None
        self.decoder = MAEDecoder(self.num_patches, self.grid_size, m.patch_size**2 * m.in_chans, m.embed_dim,
                                  m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mlp_ratio, self.noise,
                                  pos_embed=m.pos_embed, head_noise_dim=head_dim)
        for name, module in self.method.modules().items():
            self.add_module(name, module)

    def no_weight_decay(self) -> set[str]:
        return {f"{name}.{n}" for name, child in self.named_children()
                for n in getattr(child, "no_weight_decay", set)()}

    # ------------------------------------------------------------------ pixels

    def patchify(self, imgs: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, N, p*p*C]``, row-major patches, each flattened as (row, col, channel)."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)  # [B, C, h, p, w, p]
        x = x.permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
        return x.reshape(b, (h // p) * (w // p), p * p * c)  # [B, N, p*p*C]

    def unpatchify(self, x: Tensor) -> Tensor:
        """``[B, N, p*p*C]`` -> ``[B, C, H, W]``."""
        p, c = self.patch_size, self.in_chans
        gh, gw = self.grid_size
        b = x.shape[0]
        x = x.reshape(b, gh, gw, p, p, c)  # [B, h, w, p, p, C]
        x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
        return x.reshape(b, c, gh * p, gw * p)  # [B, C, H, W]

    def _patch_stats(self, imgs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        patches = self.patchify(imgs).float()  # [B, N, p*p*C]
        mean = patches.mean(dim=-1, keepdim=True)  # [B, N, 1]
        std = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()  # [B, N, 1] (unbiased var, as MAE)
        return patches, mean, std

    def target(self, imgs: Tensor) -> Tensor:
        """Regression target ``[B, N, p*p*C]``: pixels, or per-patch normalised pixels (norm_pix_loss)."""
        if not self.norm_pix_loss:
            return self.patchify(imgs).float()
        patches, mean, std = self._patch_stats(imgs)
        return (patches - mean) / std  # [B, N, p*p*C]

    def denormalize_pred(self, pred: Tensor, imgs: Tensor) -> Tensor:
        """Undo norm-pix on ``pred [..., B, N, p*p*C]`` with the patch statistics of ``imgs``
        (for display; uses the true patches' mean/std, as MAE's visualisation does)."""
        if not self.norm_pix_loss:
            return pred
        _, mean, std = self._patch_stats(imgs)
        return pred * std + mean

    # ------------------------------------------------------------------ training

    def noise_shape(self, num_masked: int) -> tuple[int, ...]:
        return self.decoder.noise_shape(num_masked)

    def forward(self, imgs: Tensor, mask: Tensor, generator: torch.Generator | None = None,
                k: int | None = None, num_masked: int | None = None, draws: dict | None = None) -> PretrainOutput:
        """``imgs [B, C, H, W]``, ``mask [B, N]`` bool -> loss and detached stats.

        ``k``: cIMLE's samples per step (None: the objective's default, ``cimle.k``). ``num_masked``: the masked
        patches per image where the mask generator knows it (saves reading it from the mask, a host sync).
        ``draws``: :meth:`draw`'s result for this step, drawn beforehand (None: drawn here from ``generator``)."""
        ids = mask_indices(mask, self.num_patches, num_masked)
        if draws is None:
            draws = self.draw(imgs.shape[0], ids.num_masked, generator, k, imgs.device)
        latent = self.encoder(imgs, ids.keep)  # [B, 1+N_vis, D]
        hidden = self.decoder.prefix(latent, ids.restore)  # [B, 1+N, Dd]
        target = self.target(imgs)  # [B, N, p*p*C]
        if self.sign_flip.p > 0:
            target = target * self._signs(draws["sign_flip"]).to(target.dtype)
        context = Context(imgs, mask, ids, hidden, target, generator, None if k is None else int(k), draws)
        return self.method.loss(self, context)

    def draw(self, batch: int, num_masked: int, generator: torch.Generator | None, k: int | None = None,
             device: torch.device | str = "cpu") -> dict:
        """Everything a step draws from ``generator``, in the order :meth:`forward` uses it: the target's sign
        flips, then the objective's draws. A step that draws them before calling a compiled model keeps the
        generator out of its graph (a generator there breaks it) and gets the same numbers."""
        draws = {}
        if self.sign_flip.p > 0:
            draws["sign_flip"] = self._sign_draw(batch, self.num_patches, generator, torch.device(device))
        draws.update(self.method.draw(self, batch, num_masked, k, generator, torch.device(device)))
        return draws

    def _sign_draw(self, batch: int, patches: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        rows = patches if self.sign_flip.scope == "patch" else 1
        draw = torch.rand((batch, rows, 1), generator=generator,
                          device=generator.device if generator is not None else device)
        return draw.to(device)

    def _signs(self, draw: Tensor) -> Tensor:
        return torch.where(draw < self.sign_flip.p, -1.0, 1.0)

    def flip_signs(self, target: Tensor, generator: torch.Generator | None) -> Tensor:
        """``[B, N, 1]`` (scope patch) or ``[B, 1, 1]`` (scope image) of -1 with probability ``data.sign_flip.p``
        else +1, drawn from the step's generator (the loss reads only the masked patches' signs)."""
        draw = self._sign_draw(target.shape[0], target.shape[1], generator, target.device)
        return self._signs(draw).to(target.dtype)

    # ------------------------------------------------------------------ evaluation

    def _context(self, imgs: Tensor, mask: Tensor) -> tuple[Tensor, MaskIndices]:
        ids = mask_indices(mask, self.num_patches)
        return self.decoder.prefix(self.encoder(imgs, ids.keep), ids.restore), ids  # [B, 1+N, Dd]

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """Deterministic reconstruction ``[B, N, p*p*C]`` (in target space: normalised if norm_pix_loss).

        ls: no noise. cimle / mvae: ``z = 0``, the mean of the N(0, I) noise / prior.
        """
        hidden, ids = self._context(imgs, mask)
        z = None
        if self.noise is not None:
            z = torch.zeros((imgs.shape[0], *self.noise_shape(ids.num_masked)), device=hidden.device,
                            dtype=hidden.dtype)
        return self.decoder.suffix(hidden, z, mask)

    def completed_images(self, patches: Tensor) -> Tensor:
        """Completions in patch layout ``[..., B, N, p*p*C]`` -> images ``[..., B, C, H, W]``."""
        lead = patches.shape[:-2]
        imgs = self.unpatchify(patches.reshape(-1, *patches.shape[-2:]))  # [prod(lead), C, H, W]
        return imgs.reshape(*lead, *imgs.shape[1:])

    @torch.no_grad()
    def sample(self, imgs: Tensor, mask: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` reconstructions ``[n, B, N, p*p*C]``: cimle z ~ N(0, I); mvae z ~ N(0, I) per masked
        token (the prior; the variational encoder is not used); ls: the same output n times."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        hidden, ids = self._context(imgs, mask)
        if self.noise is None:
            pred = self.decoder.suffix(hidden, None, mask)
            return pred[None].expand(n, *pred.shape).clone()
        shape = (imgs.shape[0], *self.noise_shape(ids.num_masked))
        noise = randn_like_on((n, *shape), generator, hidden.float()).to(hidden.dtype)  # [n, B, *noise_shape]
        return torch.stack([self.decoder.suffix(hidden, z, mask) for z in noise])  # [n, B, N, p*p*C]


def build_model(cfg: Config, **kwargs) -> MaskedAutoencoder:
    """The pretraining model for ``cfg`` (see :class:`MaskedAutoencoder`)."""
    return MaskedAutoencoder(cfg, **kwargs)
