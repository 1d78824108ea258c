"""Pretraining: one loop for every objective (ls, cimle, mvae), CPU to multi-GPU.

    python -m study pretrain --config experiments/configs/cpu-small.yaml --out runs/x [--set k=v ...] [--resume]

The run folder holds:
    config.yaml      the resolved config
    checkpoint.pt    written atomically at the end of every epoch: model, optimizer,
                     scaler, epoch, RNG states and the resolved config
    metrics.jsonl    one row per epoch: loss, lr, images/s, fraction of time waiting for data

A killed run resumed with ``--resume`` restarts the interrupted epoch from the
last checkpoint with every RNG restored, so it ends with the same weights as an
uninterrupted run (on deterministic CPU math). ``--resume --set epochs=N`` with
a larger N extends a run: the learning rate then follows the schedule of the N
epochs from the epoch reached (warmup and half-cosine over N); every other
config change is refused. A non-finite loss, or an epoch loss more than
``optim.max_loss_growth`` times the first epoch's, stops the run before the
next checkpoint, so the last good one is kept.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from study.config import Config, ConfigError, config_from_dict, config_to_dict, save_config
from study.console import duration, interactive
from study.errors import UserError, one_line
from study.io import atomic_write, atomic_write_text, remove_stale_temps
from study.run_folder import check_run_folder
from study.tensorboard_log import open_tensorboard, require_tensorboard

__all__ = ["pretrain", "TrainingDiverged", "RunExists", "ConfigMismatch", "CheckpointError", "lr_at",
           "load_checkpoint", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite, or grew past ``optim.max_loss_growth``; the last checkpoint is kept."""

    exit_status = 1  # the run failed; the command line was fine


class RunExists(UserError, RuntimeError):
    """The output folder already holds a run and --resume was not given."""


class ConfigMismatch(UserError, ValueError):
    """--resume with a config other than the checkpoint's (a larger ``epochs`` is allowed)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


def _kept(epoch: int) -> str:
    """What is on disk when epoch ``epoch`` (0-based) fails: every earlier epoch wrote a checkpoint."""
    if epoch == 0:
        return "No checkpoint was written (the first epoch did not finish)"
    return f"The checkpoint of epoch {epoch} (the last finished one) is kept"


# --------------------------------------------------------------------------- setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain ``python`` run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _device(cfg: Config, dd: Dist) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is available; use --set device=cpu")
        torch.cuda.set_device(dd.local_rank)
        return torch.device("cuda", dd.local_rank)
    return torch.device("cpu")


def _autocast(cfg: Config, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(mask_gen: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "study": mask_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, mask_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mask_gen.set_state(state["study"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- optimisation


def lr_at(epoch: float, cfg: Config, base_lr: float) -> float:
    """Linear warmup then half-cosine decay to ``min_lr`` (MAE's schedule), per fractional epoch."""
    o = cfg.optim
    if epoch < o.warmup_epochs:
        return base_lr * epoch / o.warmup_epochs
    span = max(cfg.epochs - o.warmup_epochs, 1e-8)
    progress = min((epoch - o.warmup_epochs) / span, 1.0)
    return o.min_lr + (base_lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """No weight decay on biases, norms and tokens; the Masked VAE encoder gets its lr factor."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in skip and not name.endswith(".bias")
        scale = cfg.mvae.lr_factor if name.startswith("variational_encoder.") else 1.0
        groups.setdefault((decay, scale), []).append(param)
    return [
        {"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in groups.items()
    ]


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read checkpoint {path} (damaged, or not a torch checkpoint): "
                              f"{one_line(exc)}") from exc


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, name + ".")
        elif va != vb:
            diffs.append(f"{name}: {va!r} (checkpoint) vs {vb!r} (now)")
    return diffs


def _resume_diffs(saved: dict, cfg: Config) -> list[str]:
    """Config differences that forbid a resume; a larger ``epochs`` extends the run and is allowed."""
    try:  # fields added to Config since the checkpoint was written take their defaults
        saved = config_to_dict(config_from_dict(saved))
    except ConfigError:
        saved = dict(saved)
    now = config_to_dict(cfg)
    for key in ("logging",):  # sections that do not change the run (e.g. the TensorBoard switch) may differ
        saved.pop(key, None)
        now.pop(key, None)
    if isinstance(saved.get("epochs"), int) and now["epochs"] > saved["epochs"]:
        now["epochs"] = saved["epochs"]
    return _config_diff(saved, now)


def _check_loss_growth(row: dict, first_loss: float | None, cfg: Config, epoch: int) -> float:
    """Stop a run whose epoch loss grew past ``optim.max_loss_growth`` x the first epoch's; returns the reference."""
    limit = cfg.optim.max_loss_growth
    if first_loss is None:
        return row["loss"]
    if limit is not None and first_loss > 0 and row["loss"] > limit * first_loss:
        raise TrainingDiverged(
            f"the loss grew from {first_loss:.4g} (first epoch) to {row['loss']:.4g} at epoch {epoch + 1}, more "
            f"than optim.max_loss_growth={limit:g} times; stopping. {_kept(epoch)}; lower optim.blr or set "
            "optim.clip_grad (optim.max_loss_growth=null turns this check off).")
    return first_loss


def _rewrite_metrics(path: Path, before_epoch: int) -> None:
    """Drop rows of epochs that the checkpoint does not cover (a killed run may have logged them)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["epoch"] < before_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------- the loop


def pretrain(cfg: Config, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Pretrain ``cfg`` into ``out_dir``; returns the last epoch's metrics row."""
    from study.data import build_datasets, check_images
    from study.masking import build_mask_generator
    from study.models import build_model

    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    require_tensorboard(cfg)  # a missing extra stops the run before its folder is made
    check_run_folder(out)
    if ckpt_path.exists() and not resume:
        raise RunExists(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose another --out")

    dd = _init_distributed("cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    device = _device(cfg, dd)
    _seed_everything(cfg.seed + dd.rank)
    # masks and cIMLE noise come from their own generator so that their stream
    # is saved and restored exactly, whatever the data pipeline draws.
    study_gen = torch.Generator().manual_seed(cfg.seed * 1000 + dd.rank)

    train_set, val_set = build_datasets(cfg)
    if dd.main and not ckpt_path.exists():
        check_images({"train": train_set, "val": val_set}, num_workers=cfg.data.num_workers)
    grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
    make_mask = build_mask_generator(cfg.mask, grid)

    model = build_model(cfg).to(device)
    base_lr = cfg.optim.blr * cfg.optim.batch_size * cfg.optim.accum_steps * dd.world / 256
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=base_lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    start_epoch = 0
    train_seconds = 0.0  # cumulative time in the training loop, for efficiency curves
    first_loss = None  # the first epoch's loss, the reference of optim.max_loss_growth
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        diffs = _resume_diffs(state["config"], cfg)
        if diffs:
            raise ConfigMismatch(f"--resume with a different config than {ckpt_path}: " + "; ".join(diffs)
                                 + " (only a larger epochs may change: it extends the run); drop the --set "
                                 "overrides or choose another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][min(dd.rank, len(state["rng"]) - 1)], study_gen)
        start_epoch = state["epoch"] + 1
        train_seconds = state.get("train_seconds", 0.0)
        first_loss = state.get("first_loss")
        if dd.main:
            _print_resume(out, state, cfg, start_epoch, base_lr)
    elif resume and dd.main:
        print(f"--resume: no checkpoint in {out} yet, starting from scratch")

    tb = open_tensorboard(cfg, out, start_epoch) if dd.main else None
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "snapshots"):
            remove_stale_temps(folder)  # left by a killed run's half-done atomic writes
        save_config(cfg, out / "config.yaml")
        _rewrite_metrics(out / METRICS, start_epoch)

    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if dd.world > 1:
        # LS never feeds noise, so its noise parameters get no gradient.
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dd.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=cfg.objective == "ls",
        )

    last_row: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        # the sampler's order depends only on (seed, epoch): a resumed epoch sees the same batches
        if dd.world > 1:
            sampler = DistributedSampler(train_set, num_replicas=dd.world, rank=dd.rank, seed=cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        loader = DataLoader(
            train_set, batch_size=cfg.optim.batch_size, sampler=sampler, drop_last=True,
            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        last_row = _train_one_epoch(net, model, loader, optimizer, scaler, make_mask, study_gen,
                                    cfg, device, dd, epoch, base_lr, progress)
        first_loss = _check_loss_growth(last_row, first_loss, cfg, epoch)
        train_seconds += last_row["seconds"]
        last_row["train_seconds"] = train_seconds
        if dd.main:
            _append_metrics(out / METRICS, last_row)
            if tb is not None:
                tb.log(last_row)
            if epoch + 1 in cfg.snapshot_epochs:
                _save_checkpoint(out / "snapshots" / f"epoch_{epoch + 1:04d}.pt", {
                    "model": model.state_dict(), "epoch": epoch, "config": config_to_dict(cfg),
                    "train_seconds": train_seconds, "metrics": last_row,
                })
            rng = [_rng_state(study_gen)]
            if dd.world > 1:
                gathered: list = [None] * dd.world
                dist.all_gather_object(gathered, rng[0])
                rng = gathered
            _save_checkpoint(ckpt_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "rng": rng,
                "config": config_to_dict(cfg),
                "metrics": last_row,
                "train_seconds": train_seconds,
                "first_loss": first_loss,
            })
        elif dd.world > 1:
            dist.all_gather_object([None] * dd.world, _rng_state(study_gen))
    if tb is not None:
        tb.close()
    return last_row


def _train_one_epoch(net, model, loader, optimizer, scaler, make_mask, gen, cfg: Config,
                     device, dd: Dist, epoch: int, base_lr: float, progress: bool) -> dict:
    net.train()
    steps = len(loader)
    if steps == 0:
        raise ValueError(f"the training set has fewer images than one batch ({cfg.optim.batch_size})")
    accum = cfg.optim.accum_steps
    loss_sum = torch.zeros((), device=device)
    stats_sum: dict[str, torch.Tensor] = {}
    images = 0
    wait = 0.0
    # a host sync per step is free on CPU; on CUDA check finiteness every few steps only
    check_every = 1 if device.type == "cpu" else 50
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=not (progress and dd.main and interactive()))
    optimizer.zero_grad(set_to_none=True)  # no partial accumulation leaks across epochs
    t_epoch = time.perf_counter()
    t_ready = time.perf_counter()
    lr = base_lr
    for step, (imgs, _) in enumerate(loader):
        wait += time.perf_counter() - t_ready
        if step % accum == 0:
            lr = lr_at(epoch + step / steps, cfg, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
        imgs = imgs.to(device, non_blocking=True)
        mask = make_mask(imgs.shape[0], generator=gen, device=device)  # [B, N] True = masked
        sync = nullcontext()
        if dd.world > 1 and (step + 1) % accum != 0:
            sync = net.no_sync()
        with sync:
            with _autocast(cfg, device):
                result = net(imgs, mask, generator=gen)
            scaler.scale(result.loss / accum).backward()
        if (step + 1) % accum == 0:
            if cfg.optim.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        loss_sum += result.loss.detach()
        for key, value in result.stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value.detach().float()
        images += imgs.shape[0]
        if (step + 1) % check_every == 0 or step + 1 == steps:
            if not torch.isfinite(loss_sum):
                bar.close()
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch + 1}, step {step + 1}; stopping. {_kept(epoch)}; "
                    "lower optim.blr or set optim.clip_grad."
                )
            bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        t_ready = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - t_epoch
    if dd.world > 1:  # log and check the loss of the whole global batch, the same number on every rank
        for total in (loss_sum, *stats_sum.values()):
            dist.all_reduce(total)
            total /= dd.world
    row = {
        "epoch": epoch,
        "loss": loss_sum.item() / steps,
        "lr": lr,
        "images_per_sec": images * dd.world / elapsed,
        "data_wait_frac": wait / elapsed,
        "seconds": elapsed,
    }
    row.update({key: value.item() / steps for key, value in stats_sum.items()})
    if dd.main and progress:
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  lr {lr:.2e}  "
              f"{row['images_per_sec']:.0f} img/s  data wait {100 * row['data_wait_frac']:.0f}%  "
              f"left {duration(elapsed * (cfg.epochs - epoch - 1))}", flush=True)
    return row


def _print_resume(out: Path, state: dict, cfg: Config, start_epoch: int, base_lr: float) -> None:
    done = state["config"]["epochs"]
    if start_epoch >= cfg.epochs:
        print(f"{out} is complete ({cfg.epochs} epochs); --resume --set epochs=N with a larger N extends it")
    elif cfg.epochs > done:
        print(f"extending {out} from {done} to {cfg.epochs} epochs: the lr schedule is now the one of "
              f"{cfg.epochs} epochs, taken up at epoch {start_epoch + 1} (lr {lr_at(start_epoch, cfg, base_lr):.2e})")
    else:
        print(f"resuming {out} from epoch {start_epoch} (of {cfg.epochs})")


def config_from_checkpoint(state: dict) -> Config:
    return config_from_dict(state["config"])
