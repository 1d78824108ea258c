"""Frozen feature extraction, with an in-memory cache and an optional on-disk one.

k-NN and the linear probe both read the same frozen features; they are computed
once per (checkpoint, encoder kind, split, pool) and reused. The on-disk cache
(``FeatureCache(directory)``) is keyed by a hash of the checkpoint file's
identity (resolved path, size, modification time), the encoder kind
("pretrained" / "random"), the model and data config, the seed, the split, the
pool and the images themselves (:func:`dataset_identity`: an image folder's
files with their sizes and modification times, and the transform), so a
rewritten checkpoint or an image folder changed in place never hits a stale entry.
:func:`crop_features` gives the linear probe MAE's random crops of the training set
instead (one epoch's worth, not cached).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from study.utils.console import interactive
from study.evaluation.setup import EvaluationError, NonFiniteFeatures
from study.utils.io import atomic_write
from study.utils.device import autocast

__all__ = ["POOLS", "FeatureCache", "crop_features", "crop_views", "default_pool", "extract_features", "feature_key",
           "checkpoint_identity", "dataset_identity"]

POOLS = ("cls", "mean")
PROBE_CROP_SCALE = (0.08, 1.0)  # MAE's main_linprobe.py: torchvision's RandomResizedCrop default


def default_pool(data_name: str) -> str:
    """The pool when none is given: the cls token on ImageNet-100, as MAE and DINO read theirs; the mean of
    the patch tokens elsewhere, as the committed MNIST and synthetic results were read."""
    return "cls" if data_name == "imagenet100" else "mean"


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, dataset: Dataset, *, pool: str = "cls", batch_size: int = 256,
                     device: str | torch.device = "cpu", num_workers: int = 0, precision: str = "fp32",
                     progress: bool = True, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder.features(imgs, pool)`` over ``dataset`` in order, in eval mode.

    Returns ``(features [N, D] float32 on CPU, labels [N] int64)``. The encoder's
    train/eval mode is restored afterwards. A batch whose features hold NaN or
    inf raises :class:`NonFiniteFeatures` at once.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, labels, seen = [], [], 0
    try:
        for imgs, y in tqdm(loader, desc=desc, disable=not (progress and interactive()), leave=False, dynamic_ncols=True):
            with autocast(precision, device):
                f = encoder.features(imgs.to(device, non_blocking=True), pool=pool)
            feats.append(f.float().cpu())
            _require_finite_features(feats[-1], seen, desc, precision)
            seen += len(f)
            labels.append(torch.as_tensor(y, dtype=torch.int64))
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError(f"{desc}: the dataset is empty")
    return torch.cat(feats), torch.cat(labels)


def _require_finite_features(batch: torch.Tensor, start: int, desc: str, precision: str) -> None:
    """Refuse a batch of features holding NaN or inf; ``start`` is the dataset index of its first image."""
    bad = (~torch.isfinite(batch)).flatten(1).any(1).nonzero().flatten()
    if len(bad):
        raise NonFiniteFeatures(f"{desc}: the features of {len(bad)} of the {len(batch)} images from index {start} "
                                f"on hold NaN or inf (first: image {start + int(bad[0])}); the encoder's forward pass "
                                f"overflows in {precision} or its weights are broken, so no metric of it would mean "
                                "anything and the evaluation stops")


def checkpoint_identity(path: str | Path | None) -> dict:
    """What makes a checkpoint file the same file: resolved path, size, mtime."""
    if path is None:
        return {"path": None}
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def dataset_identity(dataset: Dataset | None) -> dict | None:
    """What a dataset's images are: its class, length and transform, and for an image folder a hash of every
    file's path, label, size and mtime (the config names the folder, not what is in it)."""
    if dataset is None:
        return None
    identity = {"type": type(dataset).__name__, "len": len(dataset),
                "transform": repr(getattr(dataset, "transform", None))}
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list):
        digest = hashlib.sha1()
        for path, label in samples:
            try:
                st = os.stat(path)
                digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:  # gone since the folder was listed: a key that no complete folder has
                digest.update(f"{path}\0{label}\0missing\n".encode())
        identity["files"] = digest.hexdigest()
    return identity


def feature_key(*, checkpoint: str | Path | None, encoder: str, split: str, pool: str, config: dict,
                dataset: Dataset | None = None) -> dict:
    """The cache key of one feature matrix (a JSON-able dict).

    ``config`` is the run config as a dict; only the parts that change the
    features (model, data, seed) enter the key, with the ``dataset`` the
    features are computed from (:func:`dataset_identity`).
    """
    return {
        "checkpoint": checkpoint_identity(checkpoint) if encoder == "pretrained" else None,
        "encoder": encoder,
        "split": split,
        "pool": pool,
        "model": config.get("model"),
        "data": config.get("data"),
        "seed": config.get("seed"),
        "images": dataset_identity(dataset),
    }


def _digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _check_cache_folder(folder: Path) -> None:
    """Refuse a cache folder that is a file (or lies below one) now, not after the features are extracted."""
    above = folder
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        what = "is a file" if above == folder else f"lies below the file {above}"
        raise EvaluationError(f"--feature-cache {folder} {what}; give a folder to keep the features in")


class FeatureCache:
    """Features by key: always in memory; also on disk when ``directory`` is given."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            _check_cache_folder(self.directory)
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def path(self, key: dict) -> Path | None:
        return None if self.directory is None else self.directory / f"features_{_digest(key)}.pt"

    def get(self, key: dict, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        digest = _digest(key)
        if digest in self.memory:
            self.hits += 1
            return self.memory[digest]
        path = self.path(key)
        if path is not None and path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if stored.get("key_digest") == digest:
                    self.hits += 1
                    self.memory[digest] = (stored["features"], stored["labels"])
                    return self.memory[digest]
            except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
                pass
        self.misses += 1
        value = compute()
        self.memory[digest] = value
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"key_digest": digest, "key": json.dumps(key, sort_keys=True, default=str),
                       "features": value[0], "labels": value[1]}
            atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return value


class _Views(Dataset):
    """``dataset``'s items through a random transform of the image tensor (one crop per item)."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, y = self.dataset[i]
        return self.transform(img), y


def crop_views(dataset: Dataset, img_size: int) -> Dataset:
    """``dataset`` (eval transform) as MAE's linear probe trains on it: RandomResizedCrop(img_size, bicubic,
    scale 0.08-1) and a horizontal flip, drawn at every access. An image folder crops the decoded image, as MAE;
    in-memory data crops its eval tensor, which there is the whole image resized."""
    from torchvision.transforms import v2

    crop = [v2.RandomResizedCrop(img_size, scale=PROBE_CROP_SCALE, interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True), v2.RandomHorizontalFlip()]
    if hasattr(dataset, "with_transform"):
        tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(dataset.mean), list(dataset.std)), v2.ToPureTensor()]
        return dataset.with_transform(v2.Compose(crop + tail))
    return _Views(dataset, v2.Compose(crop))


def crop_features(encoder: torch.nn.Module, views: Dataset, *, seed: int, epoch: int,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` of one epoch's crops of ``views`` (:func:`crop_views`); the crops depend on
    ``seed`` and ``epoch`` only, and torch's global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + epoch)  # the DataLoader's workers seed from it too
        return extract_features(encoder, views, **kwargs)
