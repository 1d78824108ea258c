"""One pretraining step and the rules around it, shared by the loop, the benchmark and the experiment scripts.

    state = training_state(cfg, build_model(cfg).to(device), device)
    set_lr(state.optimizer, lr_at(epoch, cfg, state.base_lr))
    out = train_step(state, imgs)  # mask, forward, backward, AdamW step

The lr rule, the parameter groups and AdamW are :mod:`study.train.optim`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from study.config import Config
from study.data.masking import MaskGenerator, build_mask_generator
from study.methods.base import PretrainOutput
from study.train.optim import base_lr_of, build_optimizer
from study.utils.device import Dist, autocast, grad_scaler

__all__ = ["TrainingState", "training_state", "train_step"]


@dataclass
class TrainingState:
    """What every step of a run uses."""

    cfg: Config
    model: torch.nn.Module  # the bare model: its parameters and state_dict
    net: torch.nn.Module  # what the step calls: the model, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    make_mask: MaskGenerator
    mask_noise_gen: torch.Generator  # masks and cIMLE noise: its own stream, saved and restored exactly
    device: torch.device
    dist_info: Dist
    base_lr: float


def training_state(cfg: Config, model: torch.nn.Module, device: torch.device,
                   dist_info: Dist | None = None) -> TrainingState:
    """The optimizer, scaler, mask generator and mask/noise stream of ``model`` (already on ``device``);
    ``dist_info``: this process's place in a torchrun job (None: a single process)."""
    dist_info = dist_info or Dist()
    # masks and cIMLE noise come from their own generator so that their stream is saved and restored
    # exactly, whatever the data pipeline draws; on the training device, so that a GPU draws them itself
    mask_noise_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + dist_info.rank)
    base_lr = base_lr_of(cfg, dist_info.world)
    return TrainingState(cfg=cfg, model=model, net=model, optimizer=build_optimizer(model, cfg, base_lr, device),
                         scaler=grad_scaler(cfg.precision, device), make_mask=build_mask_generator(cfg.mask, cfg.patch_grid),
                         mask_noise_gen=mask_noise_gen, device=device, dist_info=dist_info, base_lr=base_lr)


def train_step(state: TrainingState, imgs: torch.Tensor, *, k: int | None = None,
               last_micro_step: bool = True) -> PretrainOutput:
    """Mask, forward and backward one micro-batch; clip and step the optimiser after the last one of an accumulation.

    ``k``: cIMLE's samples for this step (None: ``cimle.k``; the other objectives ignore it).
    """
    cfg = state.cfg
    mask = state.make_mask(imgs.shape[0], generator=state.mask_noise_gen, device=state.device)  # [B, N] True = masked
    # the step's noise is drawn here, outside what cfg.compile compiles: a generator in a graph breaks it
    draws = state.model.draw(imgs.shape[0], state.make_mask.num_masked, state.mask_noise_gen, k, state.device)
    # gradients are all-reduced only on the micro-batch that ends an accumulation
    sync = state.net.no_sync() if state.dist_info.world > 1 and not last_micro_step else nullcontext()
    with sync:
        with autocast(cfg.precision, state.device):
            result = state.net(imgs, mask, generator=state.mask_noise_gen, k=k, num_masked=state.make_mask.num_masked,
                               draws=draws)
        state.scaler.scale(result.loss / cfg.optim.accum_steps).backward()
    if last_micro_step:
        if cfg.optim.clip_grad is not None:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.clip_grad)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
    return result
