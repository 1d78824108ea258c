"""Image-folder datasets (ImageFolder layouts, ImageNet-100): PIL transforms and unreadable files.

``data.on_bad_image``: ``error`` raises :class:`BadImageError` naming the file;
``skip`` serves the next readable image instead (with its own label) and marks the
file in a shared-memory byte array made before the DataLoader starts, so every
worker (fork or spawn) writes to the same array, ``num_skipped`` and
``skipped_files`` are exact in the main process, and a bad file is read only once.
:func:`check_images` decodes every file of both splits when ``pretrain`` starts,
so a bad file in the validation split, or in a batch that ``drop_last`` leaves
out, is found before training rather than a whole run later.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from study.utils.errors import UserError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RGB_CROP_SCALE", "BadImageError", "DataError", "RobustImageFolder",
           "check_images", "eval_transform", "train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RGB_CROP_SCALE = (0.2, 1.0)


class BadImageError(UserError, RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


class DataError(UserError, FileNotFoundError):
    """An image folder that is missing, empty or laid out wrongly; the message names it and the layout wanted."""


def train_transform(img_size: int, augment: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD):
    """MAE pretraining transform for PIL images (eval transform when ``augment`` is False)."""
    from torchvision.transforms import v2

    if not augment:
        return eval_transform(img_size, mean, std)
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=RGB_CROP_SCALE, interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ])


def eval_resize_size(img_size: int) -> int:
    """The short side the eval transform resizes to before its centre crop of ``img_size`` (256 for 224)."""
    return int(round(img_size * 256 / 224))


def eval_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Resize the short side to ``img_size * 256 / 224`` (bicubic) and centre-crop ``img_size``."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.Resize(eval_resize_size(img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ])


def _shared_flags(n: int) -> torch.Tensor:
    flags = torch.zeros(max(n, 1), dtype=torch.uint8)
    try:
        flags.share_memory_()
    except (RuntimeError, OSError):  # pragma: no cover - no shared memory: counts are per process
        warnings.warn("shared memory unavailable: num_skipped counts only this process's skips")
    return flags


def _class_samples(root: Path, classes: Sequence[str] | None) -> tuple[list[str], dict[str, int], list]:
    """(classes, class_to_idx, samples) of ``root``'s class folders, as torchvision's ImageFolder finds them."""
    from torchvision.datasets import ImageFolder

    wanted = sorted(classes) if classes is not None else None

    class _Folder(ImageFolder):
        def find_classes(self, directory):
            if wanted is None:
                return super().find_classes(directory)
            missing = [c for c in wanted if not (Path(directory) / c).is_dir()]
            if missing:
                shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
                raise FileNotFoundError(f"{directory} lacks {len(missing)} of {len(wanted)} class folders: {shown}")
            return list(wanted), {c: i for i, c in enumerate(wanted)}

    try:
        folder = _Folder(str(root), loader=lambda p: p)  # we decode ourselves
    except FileNotFoundError as exc:  # no class folders, or class folders without image files
        raise DataError(f"image folder {root}: {exc} (expected <root>/<class>/<image>; for a folder of images "
                        "without class folders set data.labels=none)") from None
    return folder.classes, folder.class_to_idx, list(folder.samples)


def _unlabelled_samples(root: Path) -> list[tuple[str, int]]:
    """Every file under ``root`` (any depth, links followed) with an image suffix torchvision's ImageFolder
    accepts, sorted by path, each with label 0."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                   for name in names if name.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise DataError(f"image folder {root} holds no image files at any depth (suffixes: "
                        f"{', '.join(IMG_EXTENSIONS)}); set data.root to a folder of images")
    return [(f, 0) for f in files]


class RobustImageFolder(Dataset):
    """``torchvision.datasets.ImageFolder`` whose loader turns decode errors into a
    :class:`BadImageError` naming the file (``on_bad_image="error"``) or skips the file
    (``"skip"``): see the module docstring for how skips are counted across workers.

    ``classes`` restricts (and orders by sorted name) the class folders read; folders
    in it that are missing raise FileNotFoundError naming them.

    ``labelled=False`` reads every image file under ``root`` at any depth, in
    sorted path order, all with label 0 and no classes (unlabelled pretraining).
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, root: str | Path, transform=None, *, on_bad_image: str = "error",
                 classes: Sequence[str] | None = None, mode: str = "RGB", labelled: bool = True) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        root = Path(root)
        if not root.is_dir():
            wanted = ("a folder of images" if not labelled else "a folder of class folders (<root>/<class>/<image>, "
                      "or <root>/train/<class>/... and <root>/val/<class>/...)")
            raise DataError(f"image folder {root} does not exist; set data.root to {wanted}")
        self.root = root
        if labelled:
            self.classes, self.class_to_idx, samples = _class_samples(root, classes)
        else:
            self.classes, self.class_to_idx, samples = [], {}, _unlabelled_samples(root)
        self.samples: list[tuple[str, int]] = samples
        self.targets = [t for _, t in self.samples]
        self.num_classes = len(self.classes)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.mode = mode
        self._bad = _shared_flags(len(self.samples))
        self._warned: set[int] = set()

    # ---------------------------------------------------------------- skips

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far, by any DataLoader worker."""
        return int(self._bad.sum())

    @property
    def skipped_files(self) -> list[str]:
        return [self.samples[i][0] for i in torch.nonzero(self._bad[: len(self.samples)]).flatten().tolist()]

    def subset(self, indices: Sequence[int], transform=...) -> "RobustImageFolder":
        """A copy holding only ``indices`` (its own skip flags), with ``transform`` (default: this one's)."""
        new = copy.copy(self)
        new.samples = [self.samples[i] for i in indices]
        new.targets = [t for _, t in new.samples]
        new.transform = self.transform if transform is ... else transform
        new._bad = _shared_flags(len(new.samples))
        new._warned = set()
        return new

    def with_transform(self, transform) -> "RobustImageFolder":
        return self.subset(range(len(self.samples)), transform)

    # ---------------------------------------------------------------- items

    def _load(self, path: str):
        from PIL import Image

        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert(self.mode)  # forces the decode: errors surface here

    def __len__(self) -> int:
        return len(self.samples)

    def unreadable(self, num_workers: int = 0) -> list[tuple[int, str]]:
        """Decode every file once; returns ``(index, reason)`` of those that fail."""
        from torch.utils.data import DataLoader

        probe = _DecodeProbe(self)
        loader = DataLoader(probe, batch_size=64, num_workers=num_workers, collate_fn=list)
        return [(i, reason) for batch in loader for i, reason in batch if reason is not None]

    def __getitem__(self, index: int):
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if self._bad[j]:
                continue
            path, target = self.samples[j]
            try:
                img = self._load(path)
            except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, SyntaxError...
                if self.on_bad_image == "error":
                    raise BadImageError(f"cannot read image {path}: {type(exc).__name__}: {exc} "
                                        f"(set data.on_bad_image=skip to skip unreadable files)") from exc
                self._bad[j] = 1
                if j not in self._warned:
                    self._warned.add(j)
                    warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=2)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise BadImageError(f"no readable image in {self.root} ({n} files, all failed to decode)")


class _DecodeProbe(Dataset):
    """Item i: ``(i, None)`` if file i of ``folder`` decodes, else ``(i, "ErrorType: message")``."""

    def __init__(self, folder: RobustImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int):
        try:
            self.folder._load(self.folder.samples[i][0])
        except Exception as exc:  # noqa: BLE001 - whatever PIL raises, the file is unreadable
            return i, f"{type(exc).__name__}: {exc}"
        return i, None


def check_images(splits: dict[str, Dataset], num_workers: int = 0) -> int:
    """Decode every image of the image-folder datasets in ``splits`` (``{"train": ds, "val": ds}``;
    in-memory datasets have nothing to check).

    ``on_bad_image="error"``: a :class:`BadImageError` naming the unreadable
    files. ``"skip"``: they are marked bad (never read again, counted in
    ``num_skipped``) with one warning. Returns how many were found.
    """
    found = 0
    checked: list[torch.Tensor] = []
    for split, ds in splits.items():
        if not isinstance(ds, RobustImageFolder) or any(ds._bad is flags for flags in checked):
            continue  # a split sharing another's files and flags (unlabelled folders) is checked once
        checked.append(ds._bad)
        bad = ds.unreadable(num_workers)
        found += len(bad)
        if not bad:
            continue
        shown = "; ".join(f"{ds.samples[i][0]} ({reason.splitlines()[0]})" for i, reason in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        where = f"the {split} split ({len(ds)} images of {ds.root})"
        if ds.on_bad_image == "error":
            raise BadImageError(f"{len(bad)} unreadable image(s) in {where}: {shown}{more}; remove them or set "
                                "data.on_bad_image=skip")
        for i, _ in bad:
            ds._bad[i] = 1
            ds._warned.add(i)
        warnings.warn(f"skipping {len(bad)} unreadable image(s) in {where}: {shown}{more}", stacklevel=2)
    return found
