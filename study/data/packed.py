"""A packed training split: every image decoded once, squashed to S x S uint8, cropped on the training device.

Decoding and cropping a JPEG with PIL costs a CPU core about 3 ms, so feeding 8
GPUs takes hundreds of cores; with the pixels stored raw, a loader worker's job is
a memory copy and the crop, flip and normalisation run batched on the GPU. A pack
is plain ``.npy`` files (``images``, ``labels``, ``sizes``: each original height and
width) and ``meta.json``, readable without this package, written under a
temporary name and renamed when complete, so a folder that exists is a finished
pack. Crops follow MAE's ``RandomResizedCrop(scale=(0.2, 1))`` + flip exactly in
distribution (boxes drawn in the original's pixel sizes, mapped onto the squashed
copy); only resolution differs, since a box is resampled from the S x S copy (at
S = 256 a full-image crop is downscaled by at most 1.14x, which does not alias
visibly). FFCV does not build against current torch, and DALI is CUDA-only,
which the CPU tests cannot run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from study.data.batched_crops import crop_boxes, resample
from study.utils.console import interactive
from study.utils.errors import WRITE_ERRNOS, UserError, write_error
from study.data.image_folders import IMAGENET_MEAN, IMAGENET_STD, RGB_CROP_SCALE, RobustImageFolder

if TYPE_CHECKING:
    from study.config import Config

__all__ = ["PACK_FORMAT", "PackError", "PackedImages", "DeviceCrops", "pack_folder", "read_meta"]

PACK_FORMAT = 1
CROP_RATIO = (3 / 4, 4 / 3)


class PackError(UserError, FileNotFoundError):
    """A pack that is missing, unfinished, or made from other images than the config's."""


# --------------------------------------------------------------------------- writing


class _Squash:
    """PIL image -> (``[S, S, 3]`` uint8 tensor, (height, width) of the original)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img):
        from PIL import Image

        hw = torch.tensor([img.height, img.width], dtype=torch.int32)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()), hw


def pack_size_text(count: int, size: int) -> str:
    """The pixels of a pack of ``count`` images at ``size`` x ``size``, in MiB or GiB."""
    nbytes = count * size * size * 3
    return f"{nbytes / 2 ** 30:.1f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.1f} MiB"


@contextmanager
def _taken_back_on_failure(images: Path, needed: str):
    """Remove the half-written pack on any failure; a full disk becomes one line saying what it needs."""
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(images.parent, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(exc, exc.filename or images, f"nothing was kept (the pack needs {needed})") from exc
        raise


def _reserve(path: Path) -> None:
    """Allocate the memory-mapped file's blocks now: a full disk is then an error here, not a SIGBUS mid-pack."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise
        # a file system without fallocate: its pages are written as the pack fills
    finally:
        os.close(fd)


def pack_folder(folder: RobustImageFolder, dst: str | Path, size: int = 256, *, num_workers: int = 0,
                overwrite: bool = False, batch_size: int = 64, progress: bool = True) -> Path:
    """Decode every image of ``folder`` once into a pack at ``dst``; returns ``dst``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise PackError(f"{dst} already exists; choose another --dst or pass --overwrite to replace it")
    if size < 16:
        raise PackError(f"--size must be >= 16 pixels, got {size}")
    tmp = dst.with_name(f".{dst.name}.packing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(folder)
    with _taken_back_on_failure(tmp / "images.npy", pack_size_text(n, size)):
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        _reserve(tmp / "images.npy")
        labels = np.empty(n, dtype=np.int64)
        sizes = np.empty((n, 2), dtype=np.int32)
        # each item is read where it stands (no skip-to-next): an unreadable file must not be packed twice
        source = folder.with_transform(_Squash(size))
        loader = DataLoader(_Indexed(source), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
        keep = np.ones(n, dtype=bool)
        skipped: list[str] = []
        bar = tqdm(total=n, desc=f"pack {folder.root}", unit="img", disable=not (progress and interactive()))
        done = 0
        for batch in loader:
            for i, item, error in batch:
                if error is not None:
                    if folder.on_bad_image == "error":
                        raise PackError(f"cannot read image {folder.samples[i][0]}: {error} "
                                        "(set data.on_bad_image=skip to leave unreadable files out of the pack)")
                    keep[i] = False
                    skipped.append(folder.samples[i][0])
                    continue
                (pixels, hw), label = item
                images[i] = pixels.numpy()
                sizes[i] = hw.numpy()
                labels[i] = label
            done += len(batch)
            bar.update(len(batch))
            if progress and not interactive() and (done // batch_size) % 200 == 0:
                print(f"packed {done}/{n} images", flush=True)
        bar.close()
        images.flush()
        del images
        labels[~keep] = -1  # left out by PackedImages
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "sizes.npy", sizes)
        meta = {"format": PACK_FORMAT, "size": size, "count": n, "kept": int(keep.sum()), "classes": folder.classes,
                "root": str(folder.root.resolve()), "skipped": skipped}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


class _Indexed(Dataset):
    """Item i of ``folder`` as ``(i, item, None)``, or ``(i, None, "Error: message")`` if it cannot be decoded."""

    def __init__(self, folder: RobustImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        path, label = self.folder.samples[i]
        try:
            img = self.folder._load(path)
        except Exception as exc:  # noqa: BLE001 - whatever PIL raises, the file is unreadable
            return i, None, f"{type(exc).__name__}: {exc}"
        return i, (self.folder.transform(img), label), None


# --------------------------------------------------------------------------- reading


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        hint = " (an interrupted pack leaves a .packing folder; run pack again)" if path.with_name(
            f".{path.name}.packing").exists() else ""
        raise PackError(f"data.packed={path} is not a pack (no meta.json){hint}; make one with "
                        f"'python -m study pack --config CONFIG --dst {path}'")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != PACK_FORMAT:
        raise PackError(f"{path} is a pack of format {meta.get('format')}, this code reads format {PACK_FORMAT}; "
                        "pack the images again")
    return meta


class PackedImages(Dataset):
    """The images of a pack, fetched a batch at a time: ``ds[[i, j, ...]] -> ((pixels, sizes), labels)``.

    ``pixels`` is ``[B, S, S, 3]`` uint8 and ``sizes`` ``[B, 2]`` the originals'
    (height, width); :attr:`device_augment` turns them into model inputs on the
    training device. ``batched = True`` tells the loader to pass index lists.
    """

    batched = True
    num_skipped = 0
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, path: str | Path, img_size: int, *, expect_classes: Sequence[str] | None = None,
                 expect_count: int | None = None) -> None:
        self.path = Path(path)
        meta = read_meta(self.path)
        if expect_classes is not None and list(meta["classes"]) != list(expect_classes):
            raise PackError(f"{self.path} was packed from other classes than data.root's training split "
                            f"({len(meta['classes'])} vs {len(expect_classes)} classes); pack it again")
        if expect_count is not None and meta["count"] != expect_count:
            raise PackError(f"{self.path} holds {meta['count']} images, data.root's training split "
                            f"{expect_count}; pack it again")
        labels = np.load(self.path / "labels.npy")
        self.index = np.flatnonzero(labels >= 0)  # leaves out the files that could not be decoded
        self.labels = torch.from_numpy(labels[self.index])
        self.targets = self.labels.tolist()
        self.sizes = torch.from_numpy(np.load(self.path / "sizes.npy")[self.index])
        self.classes = list(meta["classes"])
        self.num_classes = len(self.classes)
        self.device_augment = DeviceCrops(img_size)
        self._images: np.ndarray | None = None  # opened in each process that reads: a memmap does not pickle

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, indices):
        if self._images is None:
            self._images = np.load(self.path / "images.npy", mmap_mode="r")
        idx = torch.as_tensor(indices, dtype=torch.int64)
        pixels = torch.from_numpy(np.take(self._images, self.index[idx.numpy()], axis=0))
        return (pixels, self.sizes[idx]), self.labels[idx]

    def subset(self, indices: Sequence[int]) -> "PackedImages":
        """A copy holding only the images at ``indices``."""
        new = copy.copy(self)
        keep = torch.as_tensor(list(indices), dtype=torch.int64)
        new.index = self.index[keep.numpy()]
        new.labels = self.labels[keep]
        new.targets = new.labels.tolist()
        new.sizes = self.sizes[keep]
        new._images = None
        return new

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


class DeviceCrops:
    """MAE's RandomResizedCrop(img_size, scale=(0.2, 1)) + flip + ImageNet normalisation, batched.

    Called as ``crops((pixels, sizes), generator)`` with ``pixels`` ``[B, S, S, 3]``
    uint8 and ``sizes`` ``[B, 2]`` on the training device; returns ``[B, 3, img_size, img_size]`` float32.
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = RGB_CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO, hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.img_size = img_size
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std on ``device``, copied once: a copy from pageable host memory each step would block it."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(self, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels, sizes = batch
        b, device = pixels.shape[0], pixels.device
        x = pixels.permute(0, 3, 1, 2).float().div_(255)  # [B, 3, S, S]
        sizes = sizes.to(device)
        boxes = crop_boxes(sizes[:, 0], sizes[:, 1], b, self.scale, self.ratio, generator, device=device)
        flip = torch.rand(b, generator=generator, device=device) < 0.5 if self.hflip else None
        out = resample(x, boxes, self.img_size, flip).clamp_(0, 1)
        mean, std = self._stats(device)
        return (out - mean) / std


def packed_train_set(cfg: "Config", folder: RobustImageFolder) -> PackedImages:
    """The pack named by ``data.packed``, checked against the training split it stands for."""
    return PackedImages(cfg.data.packed, cfg.model.img_size, expect_classes=folder.classes,
                        expect_count=len(folder))
