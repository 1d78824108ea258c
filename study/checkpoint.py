"""Checkpoints: save, load, the config diff a resume checks, and the RNG state that makes resume exact.

Training writes them and evaluation reads them; neither needs the other's
module for it. Every checkpoint, this project's or a foreign ``.pth``, is
read with ``torch.load(weights_only=True)``: no pickled code runs. The only
non-tensor objects this project's checkpoints hold are numpy's RNG state
(an array), allowed explicitly.
"""

from __future__ import annotations

import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from study.config import Config, ConfigError, config_from_dict, config_to_dict
from study.errors import UserError, one_line
from study.io import atomic_write
from study.runtime import Dist

__all__ = ["CHECKPOINT", "CheckpointError", "save_checkpoint", "load_checkpoint", "config_diff", "resume_diffs",
           "rng_state", "set_rng_state", "gathered_rng_states"]

CHECKPOINT = "checkpoint.pt"

# numpy's global RNG state, ("MT19937", uint32 array, pos, has_gauss, cached_gaussian), unpickles through these
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                      getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` atomically: a reader sees the previous checkpoint or this one, never half."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint (this project's or facebookresearch MAE's) without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS), warnings.catch_warnings():
            # torch warns about the pickle protocol of a file it then fails on: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"cannot read checkpoint {path} (damaged, not a torch checkpoint, or it holds "
                              f"objects other than tensors and plain data): {_load_failure(path, exc)}") from exc


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
    """Config differences that forbid a resume; a larger ``epochs`` extends the run and is allowed."""
    try:  # fields added to Config since the checkpoint was written take their defaults
        saved = config_to_dict(config_from_dict(saved))
    except ConfigError:
        saved = dict(saved)
    now = config_to_dict(cfg)
    for key in ("logging", "checkpoint_every"):  # what does not change the run (TensorBoard, how often it saves)
        saved.pop(key, None)
        now.pop(key, None)
    if isinstance(saved.get("epochs"), int) and now["epochs"] > saved["epochs"]:
        now["epochs"] = saved["epochs"]
    return config_diff(saved, now)


# --------------------------------------------------------------------------- RNG state


def rng_state(mask_noise_gen: torch.Generator) -> dict:
    """Every generator a training step draws from: python, numpy, torch (and CUDA), and the study's own."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "study": mask_noise_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, mask_noise_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mask_noise_gen.set_state(state["study"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_rng_states(mask_noise_gen: torch.Generator, dist_info: Dist) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it)."""
    mine = rng_state(mask_noise_gen)
    if dist_info.world == 1:
        return [mine]
    gathered: list = [None] * dist_info.world
    dist.all_gather_object(gathered, mine)
    return gathered
