"""End-to-end finetuning of the pretrained encoder + a linear head (the MAE recipe, via timm).

The pieces come from timm rather than being rewritten: layer-wise lr decay
(``create_optimizer_v2(layer_decay=...)`` with :meth:`ViTClassifier.group_matcher`),
drop path on the encoder's blocks, mixup / cutmix with soft-target cross-entropy,
RandAugment and random erasing, label smoothing. :data:`FINETUNE_PRESETS` holds
MAE's ViT-B/16 recipe (``vit-b``), MAE-Lite's ViT-Tiny one (``vit-t``) and a short
one for the small configs (``cpu``); ``gpu`` picks ``vit-t`` or ``vit-b`` by the
encoder's width. The classifier reads ``encoder.features(imgs, pool)``, so with
``pool="mean"`` it pools after the encoder's final norm (MAE adds a separate
``fc_norm``): the finetuned encoder stays the pretrained one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn as nn
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import AugmentOp
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from study.utils.console import interactive
from study.data.datasets import RobustImageFolder, build_datasets, build_eval_datasets
from study.evaluation.distributed import per_process_batch, shard, sum_over_processes, wrap
from study.evaluation.setup import EvaluationError
from study.utils.device import Dist, autocast, grad_scaler, seed_everything
from study.train.optim import linear_scaled_lr, warmup_cosine

__all__ = ["FinetuneSettings", "FINETUNE_PRESETS", "FinetuneResult", "ViTClassifier", "finetune",
           "finetune_settings", "finetune_columns", "set_drop_path", "set_pos_embed_training", "finetune_optimizer",
           "build_finetune_datasets", "finetune_train_transform"]


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 10
    batch_size: int = 64
    blr: float = 1e-2
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75
    drop_path: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    clip_grad: float | None = None
    pool: Literal["cls", "mean"] | None = "mean"  # None: the evaluation's pool
    # in-memory data only: train on the pretraining random-resized crops (True) or the eval images (False)
    crop_augment: bool = False
    # MAE's finetune trains the position embedding even where pretraining held it fixed (sin-cos)
    train_pos_embed: bool = True
    # one finetune per seed; empty: one, seeded with the checkpoint's pretraining seed
    seeds: tuple[int, ...] = ()
    # DataLoader workers of each process (each GPU); None: the config's data.num_workers
    num_workers: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "blr"):
            if getattr(self, name) <= 0:
                raise EvaluationError(f"finetune {name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.layer_decay <= 1:
            raise EvaluationError(f"finetune layer_decay must be in (0, 1], got {self.layer_decay}; 1 turns "
                                  "layer decay off")
        if not 0 <= self.drop_path < 1:
            raise EvaluationError(f"finetune drop_path must be in [0, 1), got {self.drop_path}")
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                             or self.num_workers < 0):
            raise EvaluationError(f"finetune num_workers must be an integer >= 0, got {self.num_workers!r}")
        object.__setattr__(self, "seeds", _checked_seeds(self.seeds))


def _checked_seeds(seeds) -> tuple[int, ...]:
    """``seeds`` as a tuple of distinct integers >= 0 (a list or a single integer is accepted)."""
    items = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    bad = [s for s in items if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise EvaluationError(f"finetune seeds must be integers >= 0, got {bad}; give e.g. seeds=(0, 1)")
    if len(set(items)) != len(items):
        raise EvaluationError(f"finetune seeds {list(items)} repeat a seed: a repeat gives the same finetune "
                              "again; list each seed once")
    return items


# batch_size is the global batch: under torchrun each of the N processes takes batch_size / N images per
# step (a batch_size that N does not divide is refused) and the lr follows the global batch, as in MAE.
# vit-b: MAE's ViT-B/16 finetune (He et al. 2022, appendix A.1 table 9, and the official FINETUNE.md command).
# vit-t: MAE-Lite's ViT-Tiny finetune (Wang et al., "A Closer Look at Self-Supervised Lightweight Vision
#   Transformers", ICML 2023), github.com/wangsr126/MAE-Lite projects/eval_tools/finetuning_exp.py (the
#   README's ViT-Tiny command: -b 1024 -e 300) over its base finetuning_mae_exp.py: layer decay 0.85, blr 1e-3
#   per 256 images, AdamW (0.9, 0.999), weight decay 0.05, 5 warm-up epochs, min lr 1e-6, mean pooling;
#   lighter regularisation than MAE's, which that paper finds suits a small ViT: RandAugment m10, mixup 0.2,
#   no cutmix, no label smoothing, no random erasing, no drop path. Its colour jitter (0.3) is not a setting
#   here: timm drops colour jitter whenever RandAugment is on, there as here.
# gpu (finetune_settings): vit-t for an encoder of ViT-T width (192) or narrower, else vit-b.
# cpu: the same recipe shortened for the small configs. In-memory data trains on the eval images without
# crops: on cpu-small MNIST the pretraining crops (scale 0.35-1) held a 3-epoch finetune at 0.48 top-1
# against 0.72 without; a 20-epoch-pretrained encoder reaches ~0.87 (linear probe 0.72) in ~25 s.
FINETUNE_PRESETS: dict[str, FinetuneSettings] = {
    "cpu": FinetuneSettings(epochs=10, batch_size=64, blr=1e-2),
    "vit-b": FinetuneSettings(epochs=100, batch_size=1024, blr=5e-4, min_lr=1e-6, warmup_epochs=5,
                              weight_decay=0.05, crop_augment=True, layer_decay=0.65, drop_path=0.1, mixup=0.8,
                              cutmix=1.0, label_smoothing=0.1,
                              rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25),
    "vit-t": FinetuneSettings(epochs=300, batch_size=1024, blr=1e-3, min_lr=1e-6, warmup_epochs=5,
                              weight_decay=0.05, betas=(0.9, 0.999), crop_augment=True, layer_decay=0.85,
                              drop_path=0.0, mixup=0.2, cutmix=0.0, label_smoothing=0.0,
                              rand_augment="rand-m10-mstd0.5-inc1", reprob=0.0, pool="mean"),
}
VIT_T_WIDTH = 192  # the widest encoder the gpu preset gives the ViT-T recipe


def finetune_settings(preset: str = "cpu", *, embed_dim: int | None = None, **changes) -> FinetuneSettings:
    """A preset with ``changes``; ``gpu`` is ``vit-t`` for ``embed_dim`` <= 192, else (or unknown) ``vit-b``."""
    if preset == "gpu":
        preset = "vit-t" if embed_dim is not None and embed_dim <= VIT_T_WIDTH else "vit-b"
    if preset not in FINETUNE_PRESETS:
        raise EvaluationError(f"unknown finetune preset {preset!r}; valid: {sorted([*FINETUNE_PRESETS, 'gpu'])}")
    return dataclasses.replace(FINETUNE_PRESETS[preset], **changes)


def finetune_columns(s: FinetuneSettings, max_steps: int | None, world: int = 1) -> dict:
    """The result columns of a finetune's settings: ``ft_<field>``, ``ft_max_steps``, ``finetune_processes``."""
    # no ft_seeds: a seed's rows should not differ by which other seeds ran beside it; no ft_num_workers:
    # how the images are loaded is not part of the recipe
    out = {f"ft_{f.name}": (str(v) if isinstance(v, tuple) else v)
           for f in dataclasses.fields(s) if f.name not in ("seeds", "num_workers") for v in [getattr(s, f.name)]}
    out["ft_max_steps"] = max_steps
    if world > 1:  # one-process rows stay as they were: no value there means one process
        out["finetune_processes"] = world
    return out


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth on the encoder's timm Blocks, rising linearly from 0 to ``rate``."""
    from timm.layers import DropPath

    blocks = list(getattr(encoder, "blocks", []))
    for i, blk in enumerate(blocks):
        r = rate * i / max(len(blocks) - 1, 1)
        for name in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


def set_pos_embed_training(encoder: nn.Module, train: bool) -> None:
    """Make the encoder's ``pos_embed`` trainable (``train``) or fixed.

    A change puts a copy in place of the parameter rather than flipping its flag: the tensor the
    encoder held (a pretrained model's, a fixed sin-cos table) is never trained.
    """
    table = getattr(encoder, "pos_embed", None)
    if isinstance(table, nn.Parameter) and table.requires_grad != train:
        encoder.pos_embed = nn.Parameter(table.detach().clone(), requires_grad=train)


class ViTClassifier(nn.Module):
    """``head(encoder.features(imgs, pool))``; parameter names ``encoder.*`` and ``head.*``."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean", dim: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        if dim is None:
            dim = getattr(encoder, "embed_dim", None) or encoder.norm.weight.shape[0]
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # as in MAE's finetune
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(imgs, pool=self.pool))

    def num_layers(self) -> int:
        return len(getattr(self.encoder, "blocks", []))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer ids for timm's layer decay: embeddings 0, block i -> i + 1, the rest (final
        norm, head) depth + 1 -- the grouping of MAE's ``param_groups_lrd``."""
        depth = self.num_layers()

        def layer_id(name: str):
            if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
                return (0,)
            if name.startswith("encoder.blocks."):
                return (int(name.split(".")[2]) + 1,)
            return (depth + 1,)

        return layer_id

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed"}


@dataclass
class FinetuneResult:
    top1: float
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    seconds: float = 0.0


def finetune_train_transform(img_size: int, settings: FinetuneSettings, mean: tuple[float, ...],
                             std: tuple[float, ...]):
    """timm's training transform for PIL images: random resized crop, flip, RandAugment, random erasing."""
    tf = create_transform(img_size, is_training=True, auto_augment=settings.rand_augment, interpolation="bicubic",
                          re_prob=settings.reprob, re_mode="pixel", re_count=1, color_jitter=None, mean=mean,
                          std=std)
    for op in augment_ops(tf):
        if "Posterize" in op.name and not isinstance(op.aug_fn, _ZeroBitsPosterize):
            op.aug_fn = _ZeroBitsPosterize(op.aug_fn)
    return tf


def augment_ops(transform) -> Iterator[AugmentOp]:
    """timm's ``AugmentOp``s inside a built transform: a Compose's ``transforms``, RandAugment's and
    AugMix's ``ops``, AutoAugment's ``policy`` (lists of ops)."""
    if isinstance(transform, AugmentOp):
        yield transform
        return
    if isinstance(transform, (list, tuple)):
        for item in transform:
            yield from augment_ops(item)
        return
    for attr in ("transforms", "ops", "policy"):
        yield from augment_ops(getattr(transform, attr, ()))


class _ZeroBitsPosterize:
    """A posterize op that keeps 0 bits as an all-black image.

    RandAugment's increasing posterize keeps ``4 - int(0.4 * magnitude)`` bits, so magnitude 10 (reached
    through the ``mstd`` noise) asks for 0; Pillow < 13 returned black there, Pillow 13 raises ValueError
    and with it the DataLoader. A class, not a closure, so the transform still pickles for spawned workers.
    """

    def __init__(self, posterize) -> None:
        self.posterize = posterize

    def __call__(self, img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return self.posterize(img, bits_to_keep, **kwargs)


def build_finetune_datasets(cfg, settings: FinetuneSettings) -> tuple[Dataset, Dataset]:
    """Training set with the finetune augmentation, val with the eval transform.

    Image folders: timm's ``create_transform`` (random resized crop, flip,
    RandAugment, random erasing), bicubic, the dataset's mean/std. In-memory
    data (digits, synthetic): the pretraining crops of ``build_datasets`` when
    ``settings.crop_augment``, else the eval images (mixup / cutmix still apply).
    """
    train, val = build_eval_datasets(cfg)
    if isinstance(train, RobustImageFolder):
        tf = finetune_train_transform(cfg.model.img_size, settings, mean=tuple(train.mean), std=tuple(train.std))
        return train.with_transform(tf), val
    if not settings.crop_augment:
        return train, val
    aug_train, _ = build_datasets(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=True)))
    return aug_train, val


@torch.no_grad()
def _evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device, num_workers: int, precision: str,
              dist: Dist = Dist()) -> float:
    """Top-1 over the whole of ``dataset``: each process counts its shard, the counts are summed."""
    model.eval()
    loader = DataLoader(shard(dataset, dist), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    correct = total = 0
    for imgs, y in loader:
        with autocast(precision, device):
            logits = model(imgs.to(device))
        correct += (logits.argmax(1).cpu() == torch.as_tensor(y)).sum().item()
        total += len(y)
    correct, total = sum_over_processes([correct, total], device, dist)
    return correct / max(total, 1)


def _batch_size(s: FinetuneSettings, n_train: int, world: int = 1) -> int:
    """Images per process and step: the global batch's share, at most the process's share of the images."""
    batch = min(per_process_batch(s.batch_size, world), n_train // world)
    use_mix = s.mixup > 0 or s.cutmix > 0
    if use_mix and batch % 2:
        batch -= 1  # timm's batch-mode mixup needs an even batch
    if batch < 1 or (use_mix and batch < 2):
        raise ValueError(f"finetune: the training set ({n_train} images) is too small for one batch")
    return batch


def _mixup_and_loss(s: FinetuneSettings, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm's batch mixup / cutmix with its soft-target loss, or plain cross-entropy when both are off."""
    if s.mixup > 0 or s.cutmix > 0:
        mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, switch_prob=s.mixup_switch_prob, mode="batch",
                      label_smoothing=s.label_smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)


def finetune_optimizer(model: ViTClassifier, s: FinetuneSettings, batch: int) -> torch.optim.Optimizer:
    """timm's AdamW with layer-wise lr decay; each group's ``lr_scale`` multiplies the scheduled lr."""
    return create_optimizer_v2(model, "adamw", lr=linear_scaled_lr(s.blr, batch), weight_decay=s.weight_decay,
                               layer_decay=s.layer_decay, betas=s.betas)


def _train_loader(train_set: Dataset, batch: int, seed: int, workers: int, device: torch.device,
                  dist: Dist) -> tuple[DataLoader, DistributedSampler | None]:
    """The training batches of this process, and the sampler to position each epoch (None in a world of one)."""
    # persistent: the workers (the ImageNet configs' 8 per process) start once, not once per epoch
    common = dict(batch_size=batch, drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    if dist.world == 1:
        return DataLoader(train_set, shuffle=True, generator=torch.Generator().manual_seed(seed), **common), None
    sampler = DistributedSampler(train_set, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    # the generator seeds the workers' augmentation: one stream per process
    return DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(seed + dist.rank),
                      **common), sampler


def finetune(encoder: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int,
             settings: FinetuneSettings | None = None, *, pool: str = "mean", device: str | torch.device = "cpu",
             seed: int = 0, num_workers: int = 0, precision: str = "fp32", progress: bool = True,
             max_steps: int | None = None, dist: Dist | None = None) -> FinetuneResult:
    """Finetune ``encoder`` with a new head; return val top-1 after the last epoch.

    ``encoder`` is modified in place (drop path, weights); a position embedding that
    ``settings.train_pos_embed`` makes trainable (or fixed) is a copy, the old tensor left as it was.
    ``max_steps`` stops early (tests, smoke runs); the lr schedule still spans ``settings.epochs``.
    ``dist``: this process's place in a torchrun job (every process calls this alike); ``settings.num_workers``,
    when set, replaces ``num_workers``.
    """
    s, dist = settings or FINETUNE_PRESETS["cpu"], dist or Dist()
    device = torch.device(device)
    pool = s.pool or pool
    t0 = time.perf_counter()
    seed_everything(seed)  # numpy too: timm's mixup draws its lambdas from it
    set_drop_path(encoder, s.drop_path)
    set_pos_embed_training(encoder, s.train_pos_embed)
    model = ViTClassifier(encoder, num_classes, pool=pool).to(device)

    batch = _batch_size(s, len(train_set), dist.world)
    base_lr = linear_scaled_lr(s.blr, batch * dist.world)
    optimizer = finetune_optimizer(model, s, batch * dist.world)
    mixup, criterion = _mixup_and_loss(s, num_classes)
    scaler = grad_scaler(precision, device)
    net = wrap(model, device, dist)
    if dist.world > 1:  # DDP gave every process rank 0's weights; mixup and drop path now draw per process
        seed_everything(seed + dist.rank)
    workers = num_workers if s.num_workers is None else s.num_workers
    loader, sampler = _train_loader(train_set, batch, seed, workers, device, dist)
    steps = len(loader)
    total_steps = s.epochs * steps if max_steps is None else min(max_steps, s.epochs * steps)
    losses: list[float] = []
    done = 0
    bar = tqdm(total=total_steps, desc="finetune", disable=not (progress and dist.main and interactive()),
               leave=False, dynamic_ncols=True)
    for epoch in range(s.epochs):
        net.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for step, (imgs, y) in enumerate(loader):
            lr = warmup_cosine(epoch + step / steps, base_lr, s.epochs, s.warmup_epochs, s.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            imgs = imgs.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            if mixup is not None:
                imgs, y = mixup(imgs, y)
            with autocast(precision, device):
                loss = criterion(net(imgs), y)
            if not torch.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"finetune loss is not finite at epoch {epoch + 1}, step {step + 1}; "
                                         "lower its blr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if s.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            total, count, done = total + loss.item(), count + 1, done + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}")
            if done >= total_steps:
                break
        total, count = sum_over_processes([total, count], device, dist)  # the epoch's loss over every process
        if count:
            losses.append(total / count)
        if done >= total_steps:
            break
    bar.close()
    top1 = _evaluate(model, val_set, max(batch, 256), device, workers, precision, dist)
    return FinetuneResult(top1=top1, losses=losses, seconds=time.perf_counter() - t0)
