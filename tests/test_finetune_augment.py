"""The finetune training transform of image folders (the gpu preset's RandAugment) at its strongest."""

import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, RandAugment

from study.config import load_config
from study.evaluation.finetune import build_finetune_datasets, finetune_settings

SIZE = 32


def _write_folder(root, classes: int = 2, per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3))
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def _images(n: int = 12) -> list[Image.Image]:
    """Noise, flat colours, gradients and near-black/near-white images of varied sizes."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(8, 80, size=2))
        kind = i % 4
        if kind == 0:
            pixels = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            pixels = np.broadcast_to(rng.integers(0, 256, 3), (h, w, 3))
        elif kind == 2:
            pixels = np.broadcast_to(np.linspace(0, 255, w)[None, :, None], (h, w, 3))
        else:
            pixels = np.full((h, w, 3), 255 * (i % 8 == 3)) + rng.integers(-3, 4, (h, w, 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture
def train_set(tmp_path):
    _write_folder(tmp_path / "imgs")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", f"model.img_size={SIZE}",
                             "model.patch_size=8", "model.in_chans=3"])
    train, _ = build_finetune_datasets(cfg, finetune_settings("gpu"))
    return train


def _rand_augment_ops(transform) -> list:
    (rand_augment,) = [t for t in transform.transforms if isinstance(t, RandAugment)]
    return rand_augment.ops


def _strongest(transform) -> list:
    """The transform's RandAugment ops, always applied at magnitude 10: the most its mstd noise reaches
    (timm clips the noisy magnitude there)."""
    ops = _rand_augment_ops(transform)
    for op in ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    return ops


def test_every_randaugment_op_of_the_gpu_preset_runs_at_the_highest_magnitude(train_set):
    random.seed(0)
    ops = _strongest(train_set.transform)
    assert [op.name for op in ops] == list(_RAND_INCREASING_TRANSFORMS)  # rand-...-inc1: the increasing ops
    images = _images()
    ran = Counter()
    for img in images:
        for op in ops:
            out = op(img)
            assert out.size == img.size and out.mode == img.mode, op.name
            ran[op.name] += 1
    assert ran == {op.name: len(images) for op in ops}

    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    assert not np.asarray(posterize(images[0])).any()  # 0 bits kept: black, as Pillow < 13 gave
    posterize.magnitude = 7.5  # 1 bit kept: Pillow's own posterize
    assert np.array_equal(np.asarray(posterize(images[0])), np.asarray(ImageOps.posterize(images[0], 1)))


def test_the_strongest_finetune_transform_loads_every_image_and_pickles(train_set):
    random.seed(0)
    np.random.seed(0)
    _strongest(train_set.transform)
    for _ in range(20):  # enough RandAugment draws that each op is picked
        for i in range(len(train_set)):
            img, label = train_set[i]
            assert img.shape == (3, SIZE, SIZE) and torch.isfinite(img).all()
    clone = pickle.loads(pickle.dumps(train_set.transform))  # spawned DataLoader workers pickle it
    assert [op.name for op in _rand_augment_ops(clone)] == list(_RAND_INCREASING_TRANSFORMS)
