"""Linear probe on frozen features (the MAE protocol): BatchNorm1d(affine=False) + Linear.

By default the probe trains on features extracted once (:mod:`study.evaluation.features`),
so a probe costs seconds on CPU; ``augment`` instead takes each epoch's features from
new random crops, as MAE does, at an encoder pass over the training set per epoch.
:data:`LINEAR_PRESETS` holds MAE's published settings (``gpu``) and a fast one for
the small configs (``cpu``). ``min_steps`` sizes the batch (:func:`probe_batch`) so a
set smaller than ImageNet still gets MAE's number of optimizer steps; the lr is scaled
by the batch actually used. On CPU the probe runs single-threaded: its ops are too
small to gain from threads, and on a shared 2-core machine two threads ran 10-20x slower.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from study.utils.console import interactive
from study.utils.device import cpu_threads
from study.train.optim import linear_scaled_lr, warmup_cosine

__all__ = ["LARS", "LinearProbeSettings", "LINEAR_PRESETS", "LinearProbeResult", "MAE_PROBE_STEPS",
           "linear_probe_settings", "probe_batch", "probe_plan", "train_linear_probe"]

# MAE's ImageNet-1k probe: 1,281,167 images at batch 16384 is 78 steps an epoch, 90 epochs
MAE_PROBE_STEPS = 7000
MIN_PROBE_BATCH = 8  # the smallest batch the step goal may ask for: BatchNorm needs a few samples a step


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017).

    For a parameter with more than one dimension the update direction
    ``d = grad + weight_decay * p`` is rescaled by the trust ratio
    ``trust_coefficient * ||p|| / ||d||`` (1 when either norm is zero), then
    passed through heavy-ball momentum: ``buf = momentum * buf + d``,
    ``p -= lr * buf``. One-dimensional parameters (biases, norm scales) get
    plain momentum SGD with no weight decay and no rescaling, as in the MoCo v3
    / MAE linear probes.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS settings lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                             f"trust_coefficient={trust_coefficient}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    ratio = torch.where((p_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * p_norm / d_norm, torch.ones_like(p_norm))
                    d = d.mul(ratio)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


@dataclass(frozen=True)
class LinearProbeSettings:
    optimizer: Literal["lars", "sgd", "adam", "adamw"] = "adam"
    blr: float = 3e-2  # lr = blr * batch / 256
    batch_size: int = 256
    epochs: int = 50
    warmup_epochs: float = 2.0
    weight_decay: float = 0.0
    momentum: float = 0.9  # lars / sgd
    min_lr: float = 0.0
    head_init_std: float = 0.01
    min_steps: int | None = None  # None: batch_size as given; else the batch that reaches it (probe_batch)
    augment: bool = False  # each epoch's features from random resized crops + flips, not the cached ones

    def __post_init__(self) -> None:
        if self.optimizer not in ("lars", "sgd", "adam", "adamw"):
            raise ValueError(f"linear probe optimizer must be lars, sgd, adam or adamw, got {self.optimizer!r}")
        for name in ("blr", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"linear probe {name} must be > 0, got {getattr(self, name)}")
        if self.min_steps is not None and self.min_steps <= 0:
            raise ValueError(f"linear probe min_steps must be > 0 or None, got {self.min_steps}")


# gpu: MAE's linear probe (He et al. 2022, appendix A.2, and main_linprobe.py's defaults), LARS, head init std
# 0.01; batch_size is the cap of the batch that gives MAE's 7,000 steps on a smaller set, and MAE's crops every
# epoch are opt-in (augment): they cost an encoder pass per epoch. cpu: tuned on the
# cpu-small MNIST features (random-init encoder 0.67; lr 1e-3 for 30 epochs underfit at 0.51), about a second on
# 4,000 cached 64-d features.
LINEAR_PRESETS: dict[str, LinearProbeSettings] = {
    "cpu": LinearProbeSettings(),
    "gpu": LinearProbeSettings(optimizer="lars", blr=0.1, batch_size=16384, epochs=90, warmup_epochs=10,
                               weight_decay=0.0, momentum=0.9, min_steps=MAE_PROBE_STEPS),
}


def linear_probe_settings(preset: str = "cpu", **changes) -> LinearProbeSettings:
    if preset not in LINEAR_PRESETS:
        raise ValueError(f"unknown linear probe preset {preset!r}; valid: {sorted(LINEAR_PRESETS)}")
    return dataclasses.replace(LINEAR_PRESETS[preset], **changes)


def probe_batch(n: int, s: LinearProbeSettings) -> int:
    """The batch the probe trains ``n`` features with: ``s.batch_size`` capped at ``n``; with ``s.min_steps``,
    the largest power of two (at most ``batch_size``, at least ``MIN_PROBE_BATCH``) whose
    ``epochs * (n // batch)`` steps
    (the last partial batch is dropped) reach ``min_steps``. ImageNet-1k at 90 epochs gives MAE's 16384."""
    batch = s.batch_size
    if s.min_steps is not None:
        per_epoch = math.ceil(s.min_steps / s.epochs)  # the steps an epoch needs
        fits = max(n // per_epoch, 1)
        batch = min(batch, max(1 << (fits.bit_length() - 1), MIN_PROBE_BATCH))
    return max(min(batch, n), 1)


def probe_plan(n: int, s: LinearProbeSettings) -> str:
    """One log line: the batch, optimizer steps and lr the probe will train ``n`` features with."""
    batch = probe_batch(n, s)
    per_epoch = n // batch
    goal = ""
    if s.min_steps:
        goal = (f" (MAE's probe: {s.min_steps})" if per_epoch * s.epochs >= s.min_steps else
                f", fewer than MAE's {s.min_steps}: too few images for a batch of {MIN_PROBE_BATCH}")
    crops = "; new crops every epoch" if s.augment else ""
    return (f"  linear-probe batch {batch} (lr {linear_scaled_lr(s.blr, batch):.4g}): {per_epoch * s.epochs} steps, "
            f"{s.epochs} epochs of {per_epoch} on {n} images{goal}{crops}")


@dataclass
class LinearProbeResult:
    top1: float  # validation accuracy after the last epoch
    train_top1: float
    train_loss: float  # mean loss of the last epoch
    losses: list[float]  # mean loss per epoch
    seconds: float
    head: nn.Module
    batch: int = 0  # the batch trained with (probe_batch)
    steps: int = 0  # optimizer steps taken


def _make_optimizer(head: nn.Module, s: LinearProbeSettings, lr: float) -> torch.optim.Optimizer:
    params = [p for p in head.parameters() if p.requires_grad]
    if s.optimizer == "lars":
        return LARS(params, lr=lr, weight_decay=s.weight_decay, momentum=s.momentum)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)


@torch.no_grad()
def _accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch: int = 65536) -> float:
    head.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        logits = head(x[i:i + batch].to(device))
        correct += (logits.argmax(1).cpu() == y[i:i + batch]).sum().item()
    return correct / max(x.shape[0], 1)


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                       val_labels: torch.Tensor, settings: LinearProbeSettings | None = None, *,
                       num_classes: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
                       progress: bool = True, threads: int | None = 1,
                       epoch_features: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> LinearProbeResult:
    """Train BatchNorm1d(affine=False) + Linear on cached features; report val top-1.

    ``epoch_features(epoch)``, if given, returns the ``(features, labels)`` epoch ``epoch`` trains on (new
    crops of the same images, in their order); ``train_features`` then serve the train top-1 only.
    ``threads``: CPU intra-op threads while training (default 1; None leaves torch's setting).
    """
    with cpu_threads(threads, device):
        return _train_linear_probe(train_features, train_labels, val_features, val_labels, settings,
                                   num_classes=num_classes, device=device, seed=seed, progress=progress,
                                   epoch_features=epoch_features)


def _train_linear_probe(train_features, train_labels, val_features, val_labels, settings, *, num_classes,
                        device, seed, progress, epoch_features) -> LinearProbeResult:
    s = settings or LINEAR_PRESETS["cpu"]
    device = torch.device(device)
    t0 = time.perf_counter()
    n, dim = train_features.shape
    if n == 0:
        raise ValueError("linear probe: no training features")
    c = int(num_classes) if num_classes is not None else int(max(train_labels.max(), val_labels.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, c)).to(device)
    with torch.no_grad():
        w = torch.empty(c, dim)
        nn.init.trunc_normal_(w, std=s.head_init_std, a=-2 * s.head_init_std, b=2 * s.head_init_std, generator=gen)
        head[1].weight.copy_(w)
        head[1].bias.zero_()
    batch = probe_batch(n, s)
    base_lr = linear_scaled_lr(s.blr, batch)
    opt = _make_optimizer(head, s, base_lr)
    x = train_features.to(device, torch.float32)
    y = train_labels.to(device, torch.int64)
    steps = n // batch  # drop the last partial batch (BatchNorm on a batch of 1 is undefined)
    losses: list[float] = []
    bar = tqdm(range(s.epochs), desc="linear probe", disable=not (progress and interactive()), leave=False, dynamic_ncols=True)
    for epoch in bar:
        head.train()
        if epoch_features is not None:
            x, y = _epoch_features(epoch_features, epoch, n, device)
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for step in range(steps):
            lr = warmup_cosine(epoch + step / steps, base_lr, s.epochs, s.warmup_epochs, s.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        losses.append(total.item() / steps)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"linear probe loss is not finite at epoch {epoch + 1}; lower its blr")
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    top1 = _accuracy(head, val_features, val_labels, device)
    train_top1 = _accuracy(head, train_features, train_labels, device)
    return LinearProbeResult(top1=top1, train_top1=train_top1, train_loss=losses[-1], losses=losses,
                             seconds=time.perf_counter() - t0, head=head.cpu(), batch=batch, steps=steps * s.epochs)


def _epoch_features(source: Callable[[int], tuple[torch.Tensor, torch.Tensor]], epoch: int, n: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = source(epoch)
    if x.shape[0] != n:
        raise ValueError(f"linear probe: epoch {epoch + 1} has {x.shape[0]} training features, not {n}")
    return x.to(device, torch.float32), y.to(device, torch.int64)
