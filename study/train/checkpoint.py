"""Checkpoints: save, load, the config diff a resume checks, and the RNG state that makes resume exact.

Training writes them and evaluation reads them, neither through the other's module.
Every checkpoint is read with ``torch.load(weights_only=True)``, so no pickled code
runs; ours hold tensors and plain data only. ``save_checkpoint`` adds a sha256 over
every key, dtype, shape, tensor byte and plain value under the reserved key
``"integrity"``, and ``load_checkpoint`` checks and drops it, because torch's zip
reader does not check the records' CRCs and damaged tensor bytes would otherwise load
as weights. Checkpoints without the record (a facebookresearch ``.pth``) load unchecked.
Each checkpoint also names the code and package versions that wrote it (``"provenance"``).
"""

from __future__ import annotations

import hashlib
import random
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from study.config import Config, ConfigError, config_from_dict, config_to_dict
from study.utils.errors import UserError, one_line
from study.utils.io import atomic_write
from study.utils.device import Dist
from study.utils.provenance import provenance

__all__ = ["CHECKPOINT", "INTEGRITY", "PROVENANCE", "CheckpointError", "save_checkpoint", "save_weights_only",
           "load_checkpoint", "state_digest", "require_finite", "config_diff", "resume_diffs", "batch_change",
           "effective_batch", "rng_state",
           "set_rng_state", "gathered_rng_states"]

CHECKPOINT = "checkpoint.pt"
INTEGRITY = "integrity"  # reserved top-level key: the state_digest of everything else
PROVENANCE = "provenance"  # the code and package versions that wrote it (study.utils.provenance); old ones lack it

# numpy's global RNG state in its tuple form ("MT19937", uint32 array, pos, has_gauss, cached_gaussian),
# which a checkpoint may hold, unpickles through these
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                      getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


def save_checkpoint(path: str | Path, state: dict, *, integrity: bool = True) -> None:
    """Write ``state`` with its integrity record, atomically: a reader sees the previous checkpoint or this one.

    A ``state`` without a ``"provenance"`` entry gets this process's; one that has it (a copy of a loaded
    checkpoint) keeps its own, since the weights were made by that code. ``integrity=False`` writes no
    record (the file then loads unchecked), for a checkpoint that the next one soon replaces.
    """
    body = {key: value for key, value in state.items() if key != INTEGRITY}
    body.setdefault(PROVENANCE, provenance())
    record = {**body, INTEGRITY: state_digest(body)} if integrity else body
    atomic_write(path, lambda tmp: torch.save(record, tmp))


WEIGHTS_ONLY_KEYS = ("model", "config", "epoch", "train_seconds", PROVENANCE)


def save_weights_only(path: str | Path, state: dict) -> None:
    """A small copy of a training checkpoint for evaluation and figures: its weights, config, epoch, training
    time and provenance (None where the checkpoint predates it), without optimizer, scaler or RNG state (what
    ``results/checkpoints/`` holds)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {key: state.get(key) for key in WEIGHTS_ONLY_KEYS})


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint (this project's or facebookresearch MAE's) without running pickled code.

    A checkpoint with an integrity record is checked against it (:class:`CheckpointError`
    if it does not match); the record is not part of the returned state.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS), warnings.catch_warnings():
            # torch warns about the pickle protocol of a file it then fails on: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read checkpoint {path} (damaged, not a torch checkpoint, or it holds "
                              f"objects other than tensors and plain data): {_load_failure(path, exc)}") from exc
    if isinstance(state, dict) and INTEGRITY in state:
        _verify(path, state)
    return state


def _load_failure(path: Path, exc: BaseException) -> str:
    """The cause of a failed ``torch.load``, without torch's advice to load unsafely (which we never do)."""
    text = str(exc)
    _, found, cause = text.partition("WeightsUnpickler error:")
    if found:
        for advice in ("Check the documentation of torch.load", "Please use `torch.serialization"):
            cause = cause.split(advice)[0]
        return "the weights-only unpickler stopped at: " + " ".join(cause.split())
    # torch's legacy reader fails on arbitrary bytes with KeyError '101', IndexError, bare EOFError ...
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return f"the file ({size} bytes) is not the zip archive torch.save writes ({one_line(exc)})"
    return one_line(exc)


def _verify(path: Path, state: dict) -> None:
    """Check ``state`` against the integrity record it carries, and remove the record."""
    record = state.pop(INTEGRITY)
    if record != state_digest(state):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the integrity record "
                              f"written with it (its bytes changed after it was saved); {_fallback(path)}")


def _fallback(path: Path) -> str:
    """What to use instead of a damaged checkpoint: the run's latest snapshot (or, for a snapshot, its checkpoint)."""
    in_snapshots = path.parent.name == "snapshots"
    folder = path.parent if in_snapshots else path.parent / "snapshots"
    others = [p for p in sorted(folder.glob("epoch_*.pt")) if p.resolve() != path.resolve()]
    if in_snapshots and (folder.parent / CHECKPOINT).is_file():
        others.append(folder.parent / CHECKPOINT)
    if not others:
        return f"there is no snapshot in {folder} to use instead: restore the file from a copy or retrain"
    if in_snapshots:
        return f"{others[-1]} may be used instead"
    # snapshots are written without the optimizer state, so they serve evaluate and export but cannot resume
    return (f"an earlier snapshot may be used instead: {others[-1]} (weights only: for evaluate and export, "
            "not --resume)")


def state_digest(state: Mapping) -> str:
    """``"sha256:<hex>"`` over the keys, tensors (dtype, shape, raw bytes) and plain values of ``state``.

    Keys are visited in sorted order, so the digest does not depend on insertion order.
    """
    digest = hashlib.sha256()
    _feed(digest, (), state)
    return "sha256:" + digest.hexdigest()


def _feed(digest, path: tuple, value) -> None:
    # every entry starts with its path and kind, so that moving bytes between entries changes the digest
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{path!r}\0tensor\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # a view of the tensor's bytes, not a copy
    elif isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        digest.update(f"{path!r}\0ndarray\0{array.dtype.str}\0{array.shape}\n".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    elif isinstance(value, Mapping):
        digest.update(f"{path!r}\0mapping\0{len(value)}\n".encode())
        for key in sorted(value, key=repr):
            _feed(digest, (*path, key), value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{path!r}\0sequence\0{len(value)}\n".encode())
        for index, item in enumerate(value):
            _feed(digest, (*path, index), item)
    else:  # plain data: numbers, strings, None, torch.dtype ...; pickle writes them back exactly
        digest.update(f"{path!r}\0{type(value).__name__}\0{value!r}\n".encode())


def require_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` naming the first floating-point tensor of ``tensors`` with a NaN or inf.

    ``what`` names the weights in the message, e.g. ``"checkpoint runs/x/checkpoint.pt"``.
    """
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = _finite(tensor)
        if not bool(finite.all()):
            bad = int(finite.size - finite.sum())
            raise CheckpointError(f"{what}: weight {name!r} holds {bad} NaN or inf value(s) of {tensor.numel()}; "
                                  "nothing computed from these weights would mean anything (the run diverged "
                                  "before they were saved?): use a checkpoint or snapshot from before that")


def _finite(tensor: torch.Tensor) -> np.ndarray:
    """``isfinite`` element-wise; through numpy where it can (several times faster than torch's on CPU)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128):
        return np.isfinite(tensor.numpy())
    return torch.isfinite(tensor).numpy()


# --------------------------------------------------------------------------- resume checks


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``"key: a (checkpoint) vs b (now)"`` for every leaf that differs between two config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        name = f"{prefix}{key}"
        va, vb = saved.get(key), now.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_diff(va, vb, name + ".")
        elif va != vb:
            diffs.append(f"{name}: {va!r} (checkpoint) vs {vb!r} (now)")
    return diffs


def resume_diffs(saved: dict, cfg: Config) -> list[str]:
    """Config differences that forbid a resume; a larger ``epochs`` extends the run and is allowed. How the
    effective batch is split (``optim.batch_size`` and ``optim.accum_steps``) is left to :func:`batch_change`."""
    try:  # fields added to Config since the checkpoint was written take their defaults
        saved = config_to_dict(config_from_dict(saved))
    except ConfigError:
        saved = dict(saved)
    now = config_to_dict(cfg)
    for key in ("logging", "checkpoint_every", "monitor"):  # what does not change the weights (logging, saving, k-NN)
        saved.pop(key, None)
        now.pop(key, None)
    for config in (saved, now):
        if isinstance(config.get("optim"), dict):
            config["optim"] = {k: v for k, v in config["optim"].items() if k not in ("batch_size", "accum_steps")}
    if isinstance(saved.get("epochs"), int) and now["epochs"] > saved["epochs"]:
        now["epochs"] = saved["epochs"]
    return config_diff(saved, now)


def effective_batch(optim: Mapping, world: int) -> tuple[int, str]:
    """The batch of one optimiser step and its factors, ``(8, "4 x 2 process(es) x 1 accumulation step(s)")``."""
    b, a = optim.get("batch_size", 1), optim.get("accum_steps", 1)
    return b * world * a, f"{b} x {world} process(es) x {a} accumulation step(s)"


def batch_change(saved: dict, saved_world: int, cfg: Config, world: int) -> str | None:
    """Why a resume on ``world`` processes changes the effective batch of a checkpoint written on ``saved_world``
    (the lr and every step follow it), or None: the split over processes and accumulation may change."""
    (before, how_before), (now, how_now) = effective_batch(saved.get("optim", {}), saved_world), \
        effective_batch(config_to_dict(cfg)["optim"], world)
    if before == now:
        return None
    return (f"the effective batch would change from {before} ({how_before}) in the checkpoint to {now} ({how_now}) "
            f"now; keep it with --set optim.effective_batch={before} (or a matching optim.batch_size / "
            "optim.accum_steps)")


# --------------------------------------------------------------------------- RNG state


def rng_state(mask_noise_gen: torch.Generator) -> dict:
    """Every generator a training step draws from: python, numpy, torch (and CUDA), and the study's own."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_rng_state(),
        "torch": torch.get_rng_state(),
        "study": mask_noise_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, mask_noise_gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` returned (numpy's state as a dict, or as numpy's own tuple)."""
    random.setstate(state["python"])
    _set_numpy_rng_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mask_noise_gen.set_state(state["study"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as plain data: a plain ``torch.load(weights_only=True)`` reads it."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_rng_state(state) -> None:
    if isinstance(state, Mapping):
        state = (state["bit_generator"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)


def gathered_rng_states(mask_noise_gen: torch.Generator, dist_info: Dist) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it)."""
    mine = rng_state(mask_noise_gen)
    if dist_info.world == 1:
        return [mine]
    gathered: list = [None] * dist_info.world
    dist.all_gather_object(gathered, mine)
    return gathered
