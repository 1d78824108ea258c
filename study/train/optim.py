"""The optimisation rules: MAE's lr (``blr x effective batch / 256``, linear warmup, half-cosine to
``optim.min_lr``), parameter groups (no weight decay on biases, norms and tokens; each parameter's lr
scaled by its objective's ``lr_scale``) and AdamW. Pretraining, the probes and finetuning share them."""

from __future__ import annotations

import dataclasses
import math

import torch

from study.config import Config, ConfigError

__all__ = ["linear_scaled_lr", "warmup_cosine", "adamw", "base_lr_of", "lr_at", "set_lr", "param_groups",
           "build_optimizer", "with_effective_batch"]


def linear_scaled_lr(blr: float, batch: int) -> float:
    """The linear scaling rule of MAE and its probes: ``blr x batch / 256``, ``batch`` the effective batch."""
    return blr * batch / 256


def warmup_cosine(epoch: float, base_lr: float, epochs: float, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_epochs``, then half-cosine to ``min_lr`` at ``epochs`` (MAE's)."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    t = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float],
          device: torch.device | str) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (each sets its own weight decay).

    On CUDA the fused kernel: one launch for all parameters and no per-parameter
    ``.item()`` host sync (the default for-each path syncs on every step count).
    On CPU the default path, whose results the committed studies were made with.
    """
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused or None)


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
