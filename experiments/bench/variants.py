"""Our side of the benchmark: trainers that step on a fixed batch, the variants they time, the cost-model parts.

A :class:`Trainer` is one of our models (LS, cIMLE or the Masked VAE) with the
training state of :mod:`study.step`, and its step is :func:`study.step.train_step`,
the training loop's. cIMLE's k is an argument of each step, so one cIMLE model serves every k; a different noise block is a
different architecture and gets its own trainer, built from a changed copy of
the config. :class:`Components` times the parts of the cost model
``E_fb + D_fb + k * D_f`` on one cIMLE model with a fixed mask and noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dataclasses

import torch
from torch import Tensor, nn

from experiments.bench.settings import Block, block_order
from study.config import Config
from study.masking import mask_indices
from study.models import build_model
from study.objectives import cimle, least_squares, per_example_squared_error
from study.runtime import autocast, seed_everything
from study.step import train_step, training_state

__all__ = ["HF_VARIANT", "Trainer", "Variant", "Components", "CostParts", "define_variants", "cost_components",
           "prime_optimizer"]

HF_VARIANT = "transformers ViTMAE"  # the row name of transformers' model


def prime_optimizer(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Create the optimizer state (one step on zero gradients) so that the first real step is a steady one."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


class Trainer:
    """One of our models with its training state (``cfg`` has the bench's batch, no accumulation), on a fixed batch."""

    def __init__(self, cfg: Config, device: torch.device, imgs: Tensor, compile_model: bool) -> None:
        self.cfg, self.device, self.imgs = cfg, device, imgs
        seed_everything(cfg.seed)
        self.state = training_state(cfg, build_model(cfg).to(device), device)
        self.model, self.optimizer, self.make_mask = self.state.model, self.state.optimizer, self.state.make_mask
        self.model.train()
        if compile_model:
            self.state.net = torch.compile(self.model)
        prime_optimizer(self.model, self.optimizer)

    def step_fn(self, k: int | None = None, eager: bool = False) -> Callable[[], Tensor]:
        """One training step with ``k`` cIMLE samples (None: the config's; LS and the Masked VAE ignore it)."""
        state = dataclasses.replace(self.state, net=self.model) if eager else self.state
        return lambda: train_step(state, self.imgs, k=k).loss.detach()


@dataclass
class Variant:
    """One timed row: the step it times, the row's fixed fields, the trainer it steps and the k it passes."""

    step: Callable[[], Tensor]
    row: dict
    trainer: Any  # Trainer, or transformers_side.HFTrainer
    k: int | None = None

    @classmethod
    def ours(cls, trainer: Trainer, row: dict, k: int | None = None) -> Variant:
        return cls(trainer.step_fn(k), row, trainer, k)


def define_variants(trainers: dict[str, Any], cfg: Config, ks: Sequence[int], late: Sequence[Block],
                    late_k: int) -> tuple[dict[str, Variant], list[tuple[Block, str]]]:
    """The timed rows by name, and (noise block, row name) of the late-noise rows.

    ``trainers``: ``ls``, ``mvae``, ``cimle@<block>`` for every block used, and ``hf`` where transformers runs.
    """
    block, chunk = cfg.noise.block, cfg.cimle.chunk
    main = trainers[f"cimle@{block}"]
    variants = {"ls": Variant.ours(trainers["ls"], {"objective": "ls", "k": None, "noise_block": None})}
    for k in ks:
        variants[f"cimle k={k}"] = Variant.ours(
            main, {"objective": "cimle", "k": k, "noise_block": block, "chunk": chunk}, k)
    variants["mvae"] = Variant.ours(trainers["mvae"], {"objective": "mvae", "k": None, "noise_block": block})
    late_spec: list[tuple[Block, str]] = []
    for b in late:
        name = f"cimle k={late_k}" if b == block and late_k in ks else f"cimle k={late_k} block={b}"
        if name not in variants:
            variants[name] = Variant.ours(
                trainers[f"cimle@{b}"], {"objective": "cimle", "k": late_k, "noise_block": b, "chunk": chunk}, late_k)
        late_spec.append((b, name))
    if "hf" in trainers:
        variants[HF_VARIANT] = Variant(trainers["hf"].step_fn(),
                                       {"objective": "ls (transformers)", "k": None, "noise_block": None},
                                       trainers["hf"])
    return variants, late_spec


class Components:
    """Closures for the cost model's parts on one cIMLE model (fixed mask, fixed noise), through the
    objective's own decode: ``decoder.masked_sampler``, the masked patches only."""

    def __init__(self, tr: Trainer) -> None:
        self.tr = tr
        model, imgs, device = tr.model, tr.imgs, tr.device
        gen = torch.Generator().manual_seed(tr.cfg.seed + 17)
        self.mask = tr.make_mask(imgs.shape[0], generator=gen, device=device)  # [B, N]
        self.ids = mask_indices(self.mask, model.num_patches)
        with torch.no_grad(), autocast(tr.cfg.precision, device):
            target = model.target(imgs)  # [B, N, p*p*C]
            self.target = target.gather(1, self.ids.masked[..., None].expand(-1, -1, target.shape[-1]))
            latent = model.encoder(imgs, self.ids.keep)  # [B, 1+N_vis, D]
            self.hidden = model.decoder.prefix(latent, self.ids.restore)  # [B, 1+N, Dd]
            # the per-sample part of the decode; what it shares across samples is done here, once
            self.decode = model.decoder.masked_sampler(self.hidden, self.mask, self.ids.masked)
        self.latent = latent.detach()
        self.grad_latent = torch.randn_like(self.latent)
        self.z = torch.randn((imgs.shape[0], *model.noise_shape(self.ids.num_masked)), generator=gen).to(device)
        # gradients for timing the optimizer step alone (set before, removed after)
        self.grads = [torch.randn_like(p) if p.requires_grad else None for p in model.parameters()]

    def encoder_fb(self) -> None:
        model = self.tr.model
        with autocast(self.tr.cfg.precision, self.tr.device):
            latent = model.encoder(self.tr.imgs, self.ids.keep)
        latent.backward(self.grad_latent.to(latent.dtype))
        model.zero_grad(set_to_none=True)

    def decoder_fb(self) -> None:
        model = self.tr.model
        latent = self.latent.detach().requires_grad_(True)  # gradient flows back to the encoder output
        with autocast(self.tr.cfg.precision, self.tr.device):
            hidden = model.decoder.prefix(latent, self.ids.restore)
            pred = model.decoder.masked_sampler(hidden, self.mask, self.ids.masked)(self.z)
            loss = least_squares(pred, self.target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def decoder_f(self) -> None:
        with torch.no_grad(), autocast(self.tr.cfg.precision, self.tr.device):
            per_example_squared_error(self.decode(self.z), self.target)

    def selection(self, k: int, chunk: int | None) -> Callable[[], None]:
        """One ``study.objectives.cimle`` call under no_grad (selection + one no-grad decode of the choice)."""
        model = self.tr.model
        gen = torch.Generator().manual_seed(5)

        def run() -> None:
            with torch.no_grad(), autocast(self.tr.cfg.precision, self.tr.device):
                cimle(self.decode, self.target, k=k, noise_shape=model.noise_shape(self.ids.num_masked),
                      chunk=chunk, generator=gen, select=self.tr.cfg.cimle.select)

        return run

    def optimizer_step(self) -> None:
        model, opt = self.tr.model, self.tr.optimizer
        for p, g in zip(model.parameters(), self.grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)


@dataclass
class CostParts:
    """The cost-model tasks timed with the variants, and the model whose selection memory is measured."""

    blocks: list[Block]  # noise blocks with D_fb and D_f components
    tasks: dict[str, Callable[[], Any]]  # component name -> closure
    selection_name: str  # the selection timing's task name (present only when it is timed)
    selection: Components  # on the selection grid's noise block


def cost_components(trainers: dict[str, Any], cfg: Config, late_spec: Sequence[tuple[Block, str]],
                    selection_block: Block, kmax: int, selection_timing: bool) -> CostParts:
    """E_fb and the optimizer step on the main cIMLE model; D_fb and D_f at the main and every late-noise block."""
    block = cfg.noise.block
    comps = {b: Components(trainers[f"cimle@{b}"])
             for b in sorted({block} | {b for b, _ in late_spec}, key=block_order)}
    sel_comp = comps[selection_block] if selection_block in comps else Components(
        trainers[f"cimle@{selection_block}"])
    main = comps[block]
    tasks: dict[str, Callable[[], Any]] = {"E_fb": main.encoder_fb, "optimizer": main.optimizer_step}
    for b, c in comps.items():
        tasks[f"D_fb@{b}"] = c.decoder_fb
        tasks[f"D_f@{b}"] = c.decoder_f
    sel_name = f"selection k={kmax}@{block}"
    if selection_timing:
        tasks[sel_name] = main.selection(kmax, cfg.cimle.chunk)
    return CostParts(blocks=list(comps), tasks=tasks, selection_name=sel_name, selection=sel_comp)
