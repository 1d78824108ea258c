"""The Masked VAE: a variational encoder peeks at the masked patches and gives ``mu, logvar
[B, N_mask, dim]``; ``z = mu + sigma * eps`` enters the decoder per masked token;
``loss = least_squares + beta * gaussian_kl``, the KL averaged per latent feature (the paper's scale
for beta = 30). Token scope is forced (the method is defined per masked token) whatever
``noise.scope`` says; ``noise.block`` / ``injection`` / ``dim`` apply. The variational encoder learns
at ``mvae.lr_factor`` times the main rate.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from study.methods import register
from study.methods.base import Context, Objective, PretrainOutput, randn_like_on
from study.models.mvae import VariationalEncoder
from study.losses import gaussian_kl, least_squares

PREFIX = "variational_encoder"


@register("mvae")
class MaskedVAE(Objective):
    def decoder_noise(self):
        return dataclasses.replace(self.cfg.noise, scope="token")

    def modules(self) -> dict[str, nn.Module]:
        m = self.cfg.model
        depth = m.depth if self.cfg.mvae.depth is None else self.cfg.mvae.depth  # the paper: the encoder's
        return {PREFIX: VariationalEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim, depth,
                                           m.num_heads, self.cfg.noise.dim, m.mlp_ratio)}

    def lr_scale(self, parameter_name: str) -> float:
        return self.cfg.mvae.lr_factor if parameter_name.startswith(PREFIX + ".") else 1.0

    def draw(self, model, batch, num_masked, k, generator, device):
        like = torch.empty((), device=device)  # float32, as the latents' noise was always drawn
        return {"eps": randn_like_on((batch, num_masked, self.cfg.noise.dim), generator, like)}

    def loss(self, model, ctx: Context) -> PretrainOutput:
        mu, logvar = getattr(model, PREFIX)(ctx.imgs, ctx.ids.masked)  # [B, N_mask, dim]
        draws = ctx.draws or self.draw(model, mu.shape[0], mu.shape[1], ctx.k, ctx.generator, mu.device)
        eps = draws["eps"]  # [B, N_mask, dim]
        z = mu + (0.5 * logvar).exp() * eps.to(mu.dtype)  # [B, N_mask, dim]
        pred = model.decoder.suffix(ctx.hidden, z, ctx.mask)  # [B, N, p*p*C]
        recon = least_squares(pred, ctx.target, ctx.mask)
        kl = gaussian_kl(mu.float(), logvar.float(), features="mean")  # per latent feature, as the paper
        loss = recon + self.cfg.mvae.beta * kl
        stats = {"recon": recon.detach(), "kl": kl.detach(), "sigma": (0.5 * logvar.detach().float()).exp().mean()}
        return PretrainOutput(loss, stats)
