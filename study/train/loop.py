"""Pretraining: one loop for every objective (ls, cimle, mvae), CPU to multi-GPU.

The run folder holds ``config.yaml``, ``checkpoint.pt`` (written atomically every
``checkpoint_every`` epochs and after the last, with every RNG state) and
``metrics.jsonl`` (one row per epoch). A killed run resumed with ``--resume``
restarts its interrupted epoch with every RNG restored, so it ends with the weights
of an uninterrupted run (on deterministic CPU math); ``--set epochs=N`` with a larger
N extends a run, another process count may take it up at the same effective batch,
and every other config change is refused. A non-finite loss, or an
epoch loss above ``optim.max_loss_growth`` times the first, stops the run before the
next checkpoint, so the last good one is kept; a failed write stops it with one
:class:`study.utils.errors.WriteError` naming the file and the checkpoint kept. A run
that fails before its first checkpoint takes back what it wrote. One process trains
into a folder at a time (:mod:`study.train.run_lock`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from study.train.checkpoint import (CHECKPOINT, CheckpointError, batch_change, gathered_rng_states, load_checkpoint,
                              resume_diffs, save_checkpoint, set_rng_state)
from study.config import Config, ConfigError, config_to_dict, save_config
from study.utils.console import duration, interactive
from study.data.datasets import build_datasets, check_images
from study.utils.errors import UserError, is_write_failure
from study.utils.io import atomic_write_text, remove_stale_temps
from study.utils.signals import Interrupted
from study.data.loader import TrainLoader
from study.data.shm import check_shared_memory
from study.methods.model import build_model
from study.train.run_folder import METRICS, FolderAtStart, check_run_folder, failed_write, record_provenance
from study.train.run_lock import RunLocked, hold_run_folder
from study.utils.device import Dist, check_precision, describe_device, init_distributed, resolve_device, seed_everything
from study.train.step import TrainingState, train_step, training_state
from study.train.optim import lr_at, set_lr, with_effective_batch
from study.train.tensorboard import open_tensorboard, require_tensorboard

EpochHook = Callable[[int, torch.nn.Module, dict], dict]  # (epoch, model, the epoch's metrics) -> more metrics

__all__ = ["pretrain", "TrainingDiverged", "RunExists", "ConfigMismatch", "CheckpointError", "load_checkpoint",
           "CHECKPOINT"]



class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite, or grew past ``optim.max_loss_growth``; the last checkpoint is kept."""

    exit_status = 1  # the run failed; the command line was fine


class RunExists(UserError, RuntimeError):
    """The output folder already holds a run and --resume was not given."""


class ConfigMismatch(UserError, ValueError):
    """--resume with a config other than the checkpoint's (a larger ``epochs`` is allowed)."""


def _kept(saved_epochs: int) -> str:
    """What is on disk when a run stops: the checkpoint that covers ``saved_epochs`` epochs, if any."""
    if saved_epochs == 0:
        return "No checkpoint was written yet"
    return f"The checkpoint of epoch {saved_epochs} is kept"


# --------------------------------------------------------------------------- run folder


def _check_loss_growth(row: dict, first_loss: float | None, cfg: Config, epoch: int, saved_epochs: int) -> float:
    """Stop a run whose epoch loss grew past ``optim.max_loss_growth`` x the first epoch's; returns the reference."""
    limit = cfg.optim.max_loss_growth
    if first_loss is None:
        return row["loss"]
    if limit is not None and first_loss > 0 and row["loss"] > limit * first_loss:
        raise TrainingDiverged(
            f"the loss grew from {first_loss:.4g} (first epoch) to {row['loss']:.4g} at epoch {epoch + 1}, more "
            f"than optim.max_loss_growth={limit:g} times; stopping. {_kept(saved_epochs)}; lower optim.blr or set "
            "optim.clip_grad (optim.max_loss_growth=null turns this check off).")
    return first_loss


def _rewrite_metrics(path: Path, before_epoch: int) -> None:
    """Drop rows of epochs that the checkpoint does not cover (a killed run may have logged them)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["epoch"] < before_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _append_metrics(path: Path, row: dict, sync: bool = True) -> None:
    """Append one row; a failed write is cut off again, so the file never ends in half a row. ``sync`` forces it
    to disk: only rows that a checkpoint covers need to survive a crash, as a resume drops the later ones
    (:func:`_rewrite_metrics`), so the other epochs skip the fsync."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the loop


@dataclass
class Progress:
    """Where a run stands: restored from the checkpoint on --resume."""

    start_epoch: int = 0
    train_seconds: float = 0.0  # cumulative time in the training loop, for efficiency curves
    first_loss: float | None = None  # the first epoch's loss, the reference of optim.max_loss_growth
    saved_epochs: int = 0  # epochs that the checkpoint on disk covers


def pretrain(cfg: Config, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
             epoch_hooks: Sequence[EpochHook] = ()) -> dict:
    """Pretrain ``cfg`` into ``out_dir``; returns the last epoch's metrics row. Each of ``epoch_hooks`` is called
    on rank 0 after every epoch as ``hook(epoch, model, row)`` and the metrics it returns join the epoch's row
    (``study.evaluation.monitor.monitor_hooks(cfg)`` builds the k-NN monitor that ``cfg.monitor`` asks for)."""
    if cfg.monitor.knn_every and not epoch_hooks:
        raise ConfigError(f"monitor.knn_every={cfg.monitor.knn_every} asks for the k-NN monitor, and no epoch hook was "
                          "given: pass epoch_hooks=study.evaluation.monitor.monitor_hooks(cfg), or set "
                          "monitor.knn_every=0")
    out = Path(out_dir)
    require_tensorboard(cfg)  # a missing extra stops the run before its folder is made
    at_start = FolderAtStart.look(out)
    done = Progress()
    try:
        check_run_folder(out)
        with hold_run_folder(out, resume):
            return _pretrain(cfg, out, resume, progress, done, epoch_hooks)
    except RunLocked:
        raise  # the folder is a live run's: nothing in it is this process's to take back
    except BaseException as exc:
        removed = at_start.undo(keep_log=not is_write_failure(exc))
        if is_write_failure(exc):
            raise failed_write(exc, out, done.saved_epochs, removed) from exc
        if isinstance(exc, Interrupted):
            raise Interrupted(f"stopped by {exc.signal_name}; {_resume_hint(out, done)}", exc.signal_name) from None
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note(_resume_hint(out, done))  # Ctrl-C stays a KeyboardInterrupt; the command line prints the note
        raise


def _resume_hint(out: Path, done: Progress) -> str:
    """What a stopped run kept and how to go on."""
    if done.saved_epochs:
        return (f"{out} keeps its checkpoint after {done.saved_epochs} epoch(s); run the same command with "
                "--resume to continue from it")
    return "no epoch was saved; run the same command again to start"


def _pretrain(cfg: Config, out: Path, resume: bool, progress: bool, done: Progress,
              epoch_hooks: Sequence[EpochHook]) -> dict:
    """The run itself; ``done`` follows what the checkpoint on disk covers, for the error of a failed run."""
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise RunExists(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose another --out")

    state, train_set = _build(cfg, check_data=not ckpt_path.exists())
    cfg = state.cfg  # accum_steps resolved for the processes at hand
    if resume and ckpt_path.exists():
        _restore(state, ckpt_path, out, done)
    elif resume and state.dist_info.main:
        print(f"--resume: no checkpoint in {out} yet, starting from scratch")

    tb = open_tensorboard(cfg, out, done.start_epoch) if state.dist_info.main else None
    try:
        if state.dist_info.main:
            _prepare_folder(cfg, out, done.start_epoch)
        state.net = _wrap(state.model, cfg, state.device, state.dist_info)
        loader = TrainLoader(train_set, cfg, state.dist_info, state.device)
        augment = getattr(train_set, "device_augment", None)  # a pack is cropped on the training device

        last_row: dict = {}
        for epoch in range(done.start_epoch, cfg.epochs):
            last_row = _train_one_epoch(state, loader.epoch(epoch), augment, epoch, progress, done.saved_epochs)
            done.first_loss = _check_loss_growth(last_row, done.first_loss, cfg, epoch, done.saved_epochs)
            done.train_seconds += last_row["seconds"]
            last_row["train_seconds"] = done.train_seconds
            if state.dist_info.main:
                _run_hooks(epoch_hooks, epoch, state.model, last_row, progress)
            _end_epoch(state, out, epoch, last_row, done, tb)
    finally:
        if tb is not None:
            tb.close()
    if state.dist_info.main and progress:  # the one thing to do next, where a log reader looks last
        print(f"done: checkpoint {ckpt_path}; evaluate it with: python -m study evaluate --checkpoint {out}",
              flush=True)
    return last_row


def _run_hooks(hooks: Sequence[EpochHook], epoch: int, model: torch.nn.Module, row: dict, progress: bool) -> None:
    """Each hook's metrics into the epoch's row (so into metrics.jsonl and TensorBoard), printed when there are any."""
    added: dict = {}
    for hook in hooks:
        added.update(hook(epoch, model, row))
    row.update(added)
    if added and progress:
        print("  " + "  ".join(f"{k} {v:.4g}" for k, v in added.items() if isinstance(v, (int, float))), flush=True)


def _build(cfg: Config, check_data: bool) -> tuple[TrainingState, Dataset]:
    """Processes, device, seeds, data, masks, model and optimiser, in the order the RNG streams expect."""
    dist_info = init_distributed("cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    device = resolve_device(cfg.device, dist_info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check_precision(cfg.precision, device)
    cfg = with_effective_batch(cfg, dist_info.world)
    if dist_info.main:
        o = cfg.optim
        print(f"training on {describe_device(device)}, {cfg.precision}; batch {o.batch_size} x {dist_info.world} "
              f"process(es) x {o.accum_steps} accumulation step(s) = {o.batch_size * dist_info.world * o.accum_steps}",
              flush=True)
    seed_everything(cfg.seed + dist_info.rank)
    train_set, val_set = build_datasets(cfg)
    _check_batches(cfg, len(train_set), dist_info.world)
    # the processes of one node share its /dev/shm; torchrun says how many there are
    check_shared_memory(train_set, cfg.optim.batch_size, cfg.data.num_workers,
                        processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if dist_info.main and check_data:
        check_images({"train": train_set, "val": val_set}, num_workers=cfg.data.num_workers)
    state = training_state(cfg, build_model(cfg).to(device), device, dist_info)
    return state, train_set


def _check_batches(cfg: Config, images: int, world: int) -> None:
    """Refuse a run whose epochs would hold no optimiser step: the loader drops a last, partial batch."""
    o = cfg.optim
    per_process = images // world
    if per_process // o.batch_size >= o.accum_steps:
        return
    where = f" ({per_process} for each of {world} processes)" if world > 1 else ""
    if per_process < o.batch_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} is larger than the {images} training images{where}; "
                          f"set optim.batch_size to at most {per_process}")
    raise ConfigError(f"optim.accum_steps={o.accum_steps} batches of optim.batch_size={o.batch_size} make one "
                      f"optimiser step, more than the {images} training images{where} hold, so the weights would "
                      f"never change; lower optim.batch_size, optim.accum_steps or optim.effective_batch")


def _restore(state: TrainingState, ckpt_path: Path, out: Path, done: Progress) -> None:
    """Load weights, optimiser, scaler and RNG from the checkpoint into ``state`` and ``done``; refuse a different
    config."""
    saved = load_checkpoint(ckpt_path)
    saved_world = len(saved["rng"])  # one RNG state per process that wrote it
    change = batch_change(saved["config"], saved_world, state.cfg, state.dist_info.world)
    if change:
        raise ConfigMismatch(f"--resume of {ckpt_path}: {change}")
    diffs = resume_diffs(saved["config"], state.cfg)
    if diffs:
        raise ConfigMismatch(f"--resume with a different config than {ckpt_path}: " + "; ".join(diffs)
                             + " (only a larger epochs may change: it extends the run); drop the --set "
                             "overrides or choose another --out")
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])
    if state.dist_info.rank < saved_world:
        # a rank the checkpoint has no state for keeps the streams seeded for it, distinct from every other rank's
        set_rng_state(saved["rng"][state.dist_info.rank], state.mask_noise_gen)
    done.start_epoch = done.saved_epochs = saved["epoch"] + 1
    done.train_seconds, done.first_loss = saved.get("train_seconds", 0.0), saved.get("first_loss")
    if state.dist_info.main:
        _print_resume(out, saved, state.cfg, done.start_epoch, state.base_lr)
        if saved_world != state.dist_info.world:
            print(f"the checkpoint was written by {saved_world} process(es), resumed on {state.dist_info.world}: "
                  "same effective batch, other images per step, so not bit-exact to an uninterrupted run")


def _prepare_folder(cfg: Config, out: Path, start_epoch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "snapshots"):
        remove_stale_temps(folder)  # left by a killed run's half-done atomic writes
    save_config(cfg, out / "config.yaml")
    record_provenance(out, start_epoch)
    _rewrite_metrics(out / METRICS, start_epoch)


def _wrap(model: torch.nn.Module, cfg: Config, device: torch.device, dist_info: Dist) -> torch.nn.Module:
    net = model
    if dist_info.world > 1:
        # the built-in objectives give every parameter a gradient each step (tests/test_train.py checks it),
        # so DDP need not search the graph for unused ones, which costs an extra pass per step
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist_info.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=model.method.find_unused_parameters,
        )
    # DDP first, then compile (PyTorch's order): dynamo's DDPOptimizer then splits the graph at DDP's gradient
    # buckets, so that each bucket's all-reduce overlaps the rest of the backward; the step draws its noise
    # before calling this (study.train.step), so the forward compiles without a graph break
    return torch.compile(net) if cfg.compile else net


def _end_epoch(state: TrainingState, out: Path, epoch: int, row: dict, done: Progress, tb) -> None:
    """Log the epoch, write a snapshot if one is due, and the checkpoint if one is (rank 0; all ranks share their RNG)."""
    cfg = state.cfg
    due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
    rng = gathered_rng_states(state.mask_noise_gen, state.dist_info) if due else None  # collective: every rank
    if not state.dist_info.main:
        return
    _append_metrics(out / METRICS, row, sync=due)
    if tb is not None:
        tb.log(row)
    if epoch + 1 in cfg.snapshot_epochs:
        save_checkpoint(out / "snapshots" / f"epoch_{epoch + 1:04d}.pt", {
            "model": state.model.state_dict(), "epoch": epoch, "config": config_to_dict(cfg),
            "train_seconds": done.train_seconds, "metrics": row,
        })
    if not due:
        return
    # the sha256 over every tensor (about 1 s per GB on a CPU core) holds up every rank, so only the
    # final checkpoint (the one evaluation and export read, kept for good) carries the record; the ones
    # before it live until the next checkpoint replaces them and load unchecked on a resume, as any
    # checkpoint without a record does (torch still refuses a truncated or malformed file)
    save_checkpoint(out / CHECKPOINT, {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "epoch": epoch,
        "rng": rng,
        "config": config_to_dict(cfg),
        "metrics": row,
        "train_seconds": done.train_seconds,
        "first_loss": done.first_loss,
    }, integrity=epoch + 1 == cfg.epochs)
    done.saved_epochs = epoch + 1


def _train_one_epoch(state: TrainingState, loader: DataLoader, augment, epoch: int, progress: bool,
                     saved_epochs: int) -> dict:
    """One pass over the loader; ``augment`` (or None) turns each batch into model inputs on the device."""
    cfg, dist_info, device, optimizer = state.cfg, state.dist_info, state.device, state.optimizer
    state.net.train()
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
               disable=not (progress and dist_info.main and interactive()))
    optimizer.zero_grad(set_to_none=True)  # no partial accumulation leaks across epochs
    t_epoch = time.perf_counter()
    t_ready = time.perf_counter()
    lr = state.base_lr
    for step, (batch, _) in enumerate(loader):
        wait += time.perf_counter() - t_ready
        imgs = _to_device(batch, device)
        if augment is not None:
            imgs = augment(imgs, state.mask_noise_gen)
        if step % accum == 0:
            lr = lr_at(epoch + step / steps, cfg, state.base_lr)
            set_lr(optimizer, lr)
        result = train_step(state, imgs, last_micro_step=(step + 1) % accum == 0)
        loss_sum += result.loss.detach()
        for key, value in result.stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value.detach().float()
        images += imgs.shape[0]
        if (step + 1) % check_every == 0 or step + 1 == steps:
            if not torch.isfinite(loss_sum):
                bar.close()
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch + 1}, step {step + 1}; stopping. {_kept(saved_epochs)}; "
                    "lower optim.blr or set optim.clip_grad."
                )
            bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        t_ready = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - t_epoch
    if dist_info.world > 1:  # log and check the loss of the whole global batch, the same number on every rank
        for total in (loss_sum, *stats_sum.values()):
            torch.distributed.all_reduce(total)
            total /= dist_info.world
    row = {"epoch": epoch, "loss": loss_sum.item() / steps, "lr": lr,
           "images_per_sec": images * dist_info.world / elapsed, "data_wait_frac": wait / elapsed, "seconds": elapsed}
    row.update({key: value.item() / steps for key, value in stats_sum.items()})
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if dist_info.main and progress:
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  lr {lr:.2e}  "
              f"{row['images_per_sec']:.0f} img/s  data wait {100 * row['data_wait_frac']:.0f}%  "
              f"left {duration(elapsed * (cfg.epochs - epoch - 1))}", flush=True)
    return row


def _to_device(batch, device: torch.device):
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True)


def _print_resume(out: Path, saved: dict, cfg: Config, start_epoch: int, base_lr: float) -> None:
    trained = saved["config"]["epochs"]
    if start_epoch >= cfg.epochs:
        print(f"{out} is complete ({cfg.epochs} epochs); --resume --set epochs=N with a larger N extends it")
    elif cfg.epochs > trained:
        print(f"extending {out} from {trained} to {cfg.epochs} epochs: the lr schedule is now the one of "
              f"{cfg.epochs} epochs, taken up at epoch {start_epoch + 1} (lr {lr_at(start_epoch, cfg, base_lr):.2e})")
    else:
        print(f"resuming {out} from epoch {start_epoch} (of {cfg.epochs})")
