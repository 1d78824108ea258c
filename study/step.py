"""One pretraining step and the rules around it, shared by the loop, the benchmark and the experiment scripts.

    state = training_state(cfg, build_model(cfg).to(device), device)
    set_lr(state.optimizer, lr_at(epoch, cfg, state.base_lr))
    out = train_step(state, imgs)  # mask, forward, backward, AdamW step

The lr rule is MAE's: ``blr x effective batch / 256``
(:func:`study.runtime.linear_scaled_lr`), warmed up linearly and then
half-cosine to ``optim.min_lr`` over ``cfg.epochs`` (:func:`lr_at`). Each
parameter's lr is scaled by its objective (``Objective.lr_scale``).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from study.config import Config, ConfigError
from study.masking import MaskGenerator, build_mask_generator
from study.methods.base import PretrainOutput
from study.runtime import Dist, adamw, autocast, grad_scaler, linear_scaled_lr, warmup_cosine

__all__ = ["TrainingState", "training_state", "train_step", "lr_at", "set_lr", "base_lr_of", "param_groups",
           "build_optimizer", "with_effective_batch"]


def base_lr_of(cfg: Config, world: int = 1) -> float:
    """The peak lr of a run on ``world`` processes: ``blr x batch x accumulation x world / 256``."""
    return linear_scaled_lr(cfg.optim.blr, cfg.optim.batch_size * cfg.optim.accum_steps * world)


def lr_at(epoch: float, cfg: Config, base_lr: float) -> float:
    """The pretraining lr at a fractional epoch: MAE's warmup and half-cosine over ``cfg.epochs``."""
    return warmup_cosine(epoch, base_lr, cfg.epochs, cfg.optim.warmup_epochs, cfg.optim.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """No weight decay on biases, norms and tokens; each parameter's lr scale is its objective's."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    method = getattr(model, "method", None)
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in skip and not name.endswith(".bias")
        scale = 1.0 if method is None else method.lr_scale(name)
        groups.setdefault((decay, scale), []).append(param)
    return [
        {"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in groups.items()
    ]


def build_optimizer(model: torch.nn.Module, cfg: Config, base_lr: float, device: torch.device) -> torch.optim.AdamW:
    return adamw(param_groups(model, cfg), base_lr, (cfg.optim.beta1, cfg.optim.beta2), device)


def with_effective_batch(cfg: Config, world: int) -> Config:
    """``cfg`` with ``optim.accum_steps`` set so that batch x processes x accum = ``optim.effective_batch``."""
    o = cfg.optim
    if o.effective_batch is None:
        return cfg
    per_step = o.batch_size * world
    if o.effective_batch % per_step:
        raise ConfigError(f"optim.effective_batch={o.effective_batch} is not a multiple of optim.batch_size "
                          f"({o.batch_size}) x {world} process(es); change one of them (e.g. --set "
                          f"optim.batch_size={o.effective_batch // world if o.effective_batch % world == 0 else 'N'})")
    return dataclasses.replace(cfg, optim=dataclasses.replace(o, accum_steps=o.effective_batch // per_step))


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
    # gradients are all-reduced only on the micro-batch that ends an accumulation
    sync = state.net.no_sync() if state.dist_info.world > 1 and not last_micro_step else nullcontext()
    with sync:
        with autocast(cfg.precision, state.device):
            result = state.net(imgs, mask, generator=state.mask_noise_gen, k=k, num_masked=state.make_mask.num_masked)
        state.scaler.scale(result.loss / cfg.optim.accum_steps).backward()
    if last_micro_step:
        if cfg.optim.clip_grad is not None:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.clip_grad)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
    return result
