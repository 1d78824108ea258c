"""The masked autoencoder: encoder + noisy decoder + objective (+ the Masked VAE head).

One model class for the three objectives (``cfg.objective``):

* ``"ls"``: MAE. Encoder once, decoder once without noise;
  ``loss = least_squares(pred, target, mask)``.
* ``"cimle"``: encoder once, ``decoder.prefix`` once, then
  ``study.objectives.cimle`` decodes k noise samples through ``decoder.suffix``
  without gradient (vmapped), keeps the nearest per image and takes
  ``least_squares`` on it with gradient: the suffix runs k + 1 times.
* ``"mvae"``: Masked VAE. A variational encoder peeks at the masked patches and
  gives ``mu, logvar [B, N_mask, dim]``; ``z = mu + sigma * eps`` enters the
  decoder per masked token; ``loss = least_squares + beta * gaussian_kl``, the KL
  averaged per latent feature (the paper's scale for beta = 30).
  Token scope is forced (the method is defined per masked token), whatever
  ``cfg.noise.scope`` says; ``cfg.noise.block`` / ``injection`` / ``dim`` apply.

Masks: ``mask [B, N]`` bool, True = masked, row-major patch order, the same
number of masked patches in every row. Index tensors are derived here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from study.config import Config, NoiseConfig
from study.masking import ids_from_mask
from study.models.decoder import MAEDecoder
from study.models.encoder import ViTEncoder
from study.models.mvae import VariationalEncoder
from study.objectives import cimle, gaussian_kl, least_squares

__all__ = ["MaskedAutoencoder", "PretrainOutput", "MaskIndices", "mask_indices", "build_model", "NORM_PIX_EPS"]

NORM_PIX_EPS = 1e-6


@dataclass
class PretrainOutput:
    """``loss``: scalar with gradient; ``stats``: detached scalars for logging."""

    loss: Tensor
    stats: dict[str, Tensor]


class MaskIndices(NamedTuple):
    keep: Tensor  # [B, N_vis] visible patch indices, ascending
    masked: Tensor  # [B, N_mask] masked patch indices, ascending
    restore: Tensor  # [B, N] position of patch n in the order (visible, masked)
    num_masked: int


def mask_indices(mask: Tensor, num_patches: int | None = None, num_masked: int | None = None) -> MaskIndices:
    """Index tensors of a bool mask ``[B, N]`` (True = masked); see :func:`study.masking.ids_from_mask`."""
    if num_patches is not None and mask.ndim == 2 and mask.shape[1] != num_patches:
        raise ValueError(f"mask has {mask.shape[1]} patches per row, the model has {num_patches}")
    keep, masked, restore = ids_from_mask(mask, num_masked)
    return MaskIndices(keep, masked, restore, masked.shape[1])


def _cimle_output(res) -> PretrainOutput:
    """cIMLE's loss and its selection statistics; ``distances`` is ``[B, k]`` (per image) or
    ``[B, k, N_mask]`` (per token), ``index`` ``[B]`` or ``[B, N_mask]``: k is dim 1 either way."""
    d = res.distances
    return PretrainOutput(res.loss, {
        "recon": res.loss.detach(),
        "dist_chosen": d.gather(1, res.index[:, None]).mean(),
        "dist_mean": d.mean(),
        "dist_gap": (d.max(dim=1).values - d.min(dim=1).values).mean(),
    })


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device, moved to ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class MaskedAutoencoder(nn.Module):
    """MAE / cIMLE / Masked VAE pretraining model built from a :class:`study.config.Config`.

    ``vectorize``: decode cIMLE's samples through ``torch.func.vmap`` (True) or
    one call per sample (False); both give the same result.
    """

    def __init__(self, cfg: Config, *, vectorize: bool = True) -> None:
        super().__init__()
        m = cfg.model
        if cfg.objective not in ("ls", "cimle", "mvae"):
            raise ValueError(f"objective must be 'ls', 'cimle' or 'mvae', got {cfg.objective!r}")
        self.objective = cfg.objective
        # the objective's settings, read once here; forward() takes k per call (as MAE takes mask_ratio)
        self.cimle_k = cfg.cimle.k
        self.cimle_chunk = cfg.cimle.chunk
        self.cimle_select = cfg.cimle.select
        self.mvae_beta = cfg.mvae.beta
        self.vectorize = vectorize
        self.patch_size = m.patch_size
        self.in_chans = m.in_chans
        self.norm_pix_loss = m.norm_pix_loss

        self.encoder = ViTEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads,
                                  m.mlp_ratio, m.drop_path, m.pos_embed)
        self.num_patches = self.encoder.num_patches
        self.grid_size = tuple(self.encoder.patch_embed.grid_size)
        noise: NoiseConfig | None = None
        if self.objective == "cimle":
            noise = cfg.noise
        elif self.objective == "mvae":
            noise = dataclasses.replace(cfg.noise, scope="token")
        self.noise = noise
        # with noise in the head, least squares gets the same head (fed z = 0): the same model for every objective
        head_dim = cfg.noise.dim if cfg.noise.block == "head" else None
        self.decoder = MAEDecoder(self.num_patches, self.grid_size, m.patch_size**2 * m.in_chans, m.embed_dim,
                                  m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mlp_ratio, noise,
                                  pos_embed=m.pos_embed, head_noise_dim=head_dim)
        self.variational_encoder: VariationalEncoder | None = None
        if self.objective == "mvae":
            depth = m.depth if cfg.mvae.depth is None else cfg.mvae.depth  # the paper: the encoder's architecture
            self.variational_encoder = VariationalEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim,
                                                          depth, m.num_heads, cfg.noise.dim, m.mlp_ratio)

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        names |= {f"decoder.{n}" for n in self.decoder.no_weight_decay()}
        if self.variational_encoder is not None:
            names |= {f"variational_encoder.{n}" for n in self.variational_encoder.no_weight_decay()}
        return names

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
                k: int | None = None, num_masked: int | None = None) -> PretrainOutput:
        """``imgs [B, C, H, W]``, ``mask [B, N]`` bool -> loss and detached stats.

        ``k``: cIMLE's samples per step (default the config's ``cimle.k``). ``num_masked``: the masked
        patches per image where the mask generator knows it (saves reading it from the mask, a host sync)."""
        k = self.cimle_k if k is None else int(k)
        ids = mask_indices(mask, self.num_patches, num_masked)
        latent = self.encoder(imgs, ids.keep)  # [B, 1+N_vis, D]
        hidden = self.decoder.prefix(latent, ids.restore)  # [B, 1+N, Dd]
        target = self.target(imgs)  # [B, N, p*p*C]

        if self.objective == "ls":
            pred = self.decoder.suffix(hidden, None, mask)  # [B, N, p*p*C]
            loss = least_squares(pred, target, mask)
            return PretrainOutput(loss, {"recon": loss.detach()})

        if self.objective == "cimle" and self.cimle_select == "token":
            return self._cimle_token(hidden, target, mask, ids, generator, k)

        if self.objective == "cimle":
            res = cimle(
                lambda z: self.decoder.suffix(hidden, z, mask),
                target,
                k=k,
                noise_shape=self.noise_shape(ids.num_masked),
                mask=mask,
                chunk=self.cimle_chunk,
                generator=generator,
                vectorize=self.vectorize,
            )
            return _cimle_output(res)

        # mvae
        mu, logvar = self.variational_encoder(imgs, ids.masked)  # [B, N_mask, dim]
        eps = _randn(tuple(mu.shape), generator, mu.float())  # [B, N_mask, dim]
        z = mu + (0.5 * logvar).exp() * eps.to(mu.dtype)  # [B, N_mask, dim]
        pred = self.decoder.suffix(hidden, z, mask)  # [B, N, p*p*C]
        recon = least_squares(pred, target, mask)
        kl = gaussian_kl(mu.float(), logvar.float(), features="mean")  # per latent feature, as the paper
        loss = recon + self.mvae_beta * kl
        stats = {"recon": recon.detach(), "kl": kl.detach(), "sigma": (0.5 * logvar.detach().float()).exp().mean()}
        return PretrainOutput(loss, stats)

    def _cimle_token(self, hidden: Tensor, target: Tensor, mask: Tensor, ids: MaskIndices,
                     generator: torch.Generator | None, k: int) -> PretrainOutput:
        """Factorised cIMLE: each masked patch keeps its nearest of k samples. The objective sees only the
        masked patches ``[B, N_mask, ...]``, whose rows line up with the token noise ``z [B, N_mask, dim]``;
        the config guarantees that a patch's output depends on its own noise row only (exact selection)."""
        rows = ids.masked[..., None].expand(-1, -1, target.shape[-1])  # [B, N_mask, p*p*C]
        res = cimle(
            lambda z: self.decoder.suffix(hidden, z, mask).gather(1, rows),
            target.gather(1, rows),
            k=k,
            noise_shape=self.noise_shape(ids.num_masked),
            chunk=self.cimle_chunk,
            generator=generator,
            vectorize=self.vectorize,
            select="token",
        )
        return _cimle_output(res)

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
        noise = _randn((n, *shape), generator, hidden.float()).to(hidden.dtype)  # [n, B, *noise_shape]
        return torch.stack([self.decoder.suffix(hidden, z, mask) for z in noise])  # [n, B, N, p*p*C]


def build_model(cfg: Config, **kwargs) -> MaskedAutoencoder:
    """The pretraining model for ``cfg`` (see :class:`MaskedAutoencoder`)."""
    return MaskedAutoencoder(cfg, **kwargs)
