"""What the benchmark times: the training loop's own step of each objective's model and the parts of the cIMLE
cost model ``E_fb + D_fb + k * D_f``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from experiments.bench.settings import Plan
from study.config import Config, with_overrides
from study.data.masking import mask_indices
from study.losses import cimle, least_squares, per_example_squared_error
from study.methods.model import build_model
from study.train.step import train_step, training_state
from study.utils.device import autocast, samples_that_fit, seed_everything


class Trainer:
    """A model with the training loop's state on a fixed batch."""

    def __init__(self, cfg: Config, device: torch.device, imgs: Tensor, compile_model: bool = False) -> None:
        self.cfg, self.device, self.imgs = cfg, device, imgs
        seed_everything(cfg.seed)
        self.state = training_state(cfg, build_model(cfg).to(device), device)
        self.model, self.optimizer, self.make_mask = self.state.model, self.state.optimizer, self.state.make_mask
        self.model.train()
        if compile_model:
            self.state.net = torch.compile(self.model)
        for p in self.model.parameters():  # create the optimizer state: the first timed step is then steady
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_fn(self, k: int | None = None) -> Callable[[], Tensor]:
        return lambda: train_step(self.state, self.imgs, k=k).loss.detach()


@dataclass
class Variant:
    step: Callable[[], Tensor]
    row: dict
    trainer: Trainer


def define_variants(plan: Plan, imgs: Tensor) -> tuple[dict[str, Variant], Trainer]:
    """The timed rows by name, and the cIMLE trainer (the cost model's parts run on it)."""
    cfg, block = plan.cfg, plan.cfg.noise.block

    def ours(objective: str) -> Trainer:
        return Trainer(with_overrides(cfg, f"objective={objective}"), plan.device, imgs)

    def row(tr: Trainer, objective: str, k: int | None = None) -> Variant:
        extra = {"chunk": cfg.cimle.chunk} if objective == "cimle" else {}
        return Variant(tr.step_fn(k), {"objective": objective, "k": k, "noise_block": block, **extra}, tr)

    ls, cimle_trainer, mvae = ours("ls"), ours("cimle"), ours("mvae")
    variants = {"ls": row(ls, "ls")} | {f"cimle k={k}": row(cimle_trainer, "cimle", k) for k in plan.args.k}
    variants["mvae"] = row(mvae, "mvae")
    return variants, cimle_trainer


class Components:
    """The cost model's parts on one cIMLE model (fixed mask and noise) through the objective's own decode."""

    def __init__(self, tr: Trainer) -> None:
        self.tr, model, imgs, device = tr, tr.model, tr.imgs, tr.device
        gen = torch.Generator().manual_seed(tr.cfg.seed + 17)
        self.mask = tr.make_mask(imgs.shape[0], generator=gen, device=device)  # [B, N]
        self.ids = mask_indices(self.mask, model.num_patches)
        with torch.no_grad(), autocast(tr.cfg.precision, device):
            target = model.target(imgs)  # [B, N, p*p*C]
            self.target = target.gather(1, self.ids.masked[..., None].expand(-1, -1, target.shape[-1]))
            latent = model.encoder(imgs, self.ids.keep)  # [B, 1+N_vis, D]
            hidden = model.decoder.prefix(latent, self.ids.restore)  # [B, 1+N, Dd]
            # the per-sample part of the decode; what it shares across samples is done here, once
            self.decode = model.decoder.masked_sampler(hidden, self.mask, self.ids.masked)
        self.latent = latent.detach()
        self.grad_latent = torch.randn_like(self.latent)
        self.z = torch.randn((imgs.shape[0], *model.noise_shape(self.ids.num_masked)), generator=gen).to(device)

    def encoder_fb(self) -> None:
        with autocast(self.tr.cfg.precision, self.tr.device):
            latent = self.tr.model.encoder(self.tr.imgs, self.ids.keep)
        latent.backward(self.grad_latent.to(latent.dtype))
        self.tr.model.zero_grad(set_to_none=True)

    def decoder_fb(self) -> None:
        decoder = self.tr.model.decoder
        latent = self.latent.detach().requires_grad_(True)  # gradient flows back to the encoder output
        with autocast(self.tr.cfg.precision, self.tr.device):
            hidden = decoder.prefix(latent, self.ids.restore)
            loss = least_squares(decoder.masked_sampler(hidden, self.mask, self.ids.masked)(self.z), self.target)
        loss.backward()
        self.tr.model.zero_grad(set_to_none=True)

    def decoder_f(self) -> None:
        with torch.no_grad(), autocast(self.tr.cfg.precision, self.tr.device):
            per_example_squared_error(self.decode(self.z), self.target)

    def selection(self, k: int, chunk: int | str | None) -> Callable[[], None]:
        gen, shape = torch.Generator().manual_seed(5), self.tr.model.noise_shape(self.ids.num_masked)
        if chunk == "auto":  # as the objective resolves it, from the free memory before the step
            chunk = samples_that_fit(k, self.tr.model.decoder.sample_bytes(*self.ids.masked.shape), self.tr.device)

        def run() -> None:
            with torch.no_grad(), autocast(self.tr.cfg.precision, self.tr.device):
                cimle(self.decode, self.target, k=k, noise_shape=shape, chunk=chunk, generator=gen,
                      select=self.tr.cfg.cimle.select)

        return run


def cost_components(plan: Plan, trainer: Trainer) -> tuple[dict[str, Callable[[], Any]], Components]:
    """The cost-model tasks by name, and their components (for the selection-memory grid)."""
    comps = Components(trainer)
    tasks: dict[str, Callable[[], Any]] = {"E_fb": comps.encoder_fb, "D_fb": comps.decoder_fb, "D_f": comps.decoder_f}
    if not plan.args.no_selection_timing:
        tasks[f"selection k={plan.args.k[-1]}"] = comps.selection(plan.args.k[-1], plan.cfg.cimle.chunk)
    return tasks, comps
