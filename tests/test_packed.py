"""The packed input pipeline: crops distributed as torchvision's, packs that round-trip, training that reads them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from conftest import image_folder_config, make_image_folder, make_train_val_folders
from study.data.batched_crops import crop_boxes, resample
from study.utils.errors import UserError
from study.data.image_folders import RobustImageFolder
from study.data.packed import DeviceCrops, PackedImages, PackError, pack_folder
from study.train.loop import load_checkpoint, pretrain

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def _torchvision_boxes(h: int, w: int, n: int, seed: int) -> np.ndarray:
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    crop = v2.RandomResizedCrop(224, scale=SCALE, ratio=RATIO)
    img = torch.empty(3, h, w)
    rows = []
    for _ in range(n):
        p = crop.make_params([img])
        rows.append((p["top"], p["left"], p["height"], p["width"]))
    return np.asarray(rows, dtype=np.float64)


def _ours(h: int, w: int, n: int, seed: int) -> np.ndarray:
    b = crop_boxes(torch.full((n,), h), torch.full((n,), w), n, SCALE, RATIO, torch.Generator().manual_seed(seed))
    return torch.stack([b.top, b.left, b.height, b.width], 1).double().numpy()


@pytest.mark.parametrize("h,w", [(375, 500), (500, 333), (224, 224), (60, 400)])
def test_crop_boxes_follow_torchvisions_random_resized_crop(h, w):
    """Area fraction, aspect ratio and centre of the boxes: same distribution as torchvision's (KS test)."""
    n = 4000
    theirs, ours = _torchvision_boxes(h, w, n, seed=1), _ours(h, w, n, seed=2)
    for boxes in (theirs, ours):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()

    def stats(b):
        return {"area": b[:, 2] * b[:, 3] / (h * w), "aspect": b[:, 3] / b[:, 2],
                "cy": (b[:, 0] + b[:, 2] / 2) / h, "cx": (b[:, 1] + b[:, 3] / 2) / w}

    t, o = stats(theirs), stats(ours)
    for key in t:
        p = ks_2samp(t[key], o[key]).pvalue
        assert p > 1e-3, (key, p)
    # the fallback (no try fits: a very wide image) is torchvision's centred, ratio-clamped box
    if w / h > RATIO[1]:
        assert np.isclose((theirs[:, 3] / theirs[:, 2]).max(), (ours[:, 3] / ours[:, 2]).max(), atol=0.02)


def test_a_shifted_distribution_is_told_apart():
    """The KS check above can fail: boxes drawn with another scale range are rejected."""
    theirs = _torchvision_boxes(375, 500, 4000, seed=1)
    b = crop_boxes(torch.full((4000,), 375), torch.full((4000,), 500), 4000, (0.3, 1.0), RATIO,
                   torch.Generator().manual_seed(2))
    area = (b.height * b.width).double().numpy() / (375 * 500)
    assert ks_2samp(theirs[:, 2] * theirs[:, 3] / (375 * 500), area).pvalue < 1e-6


def test_resampled_box_matches_torchvisions_resized_crop():
    """A box cut from the image and resized (torchvision, bicubic) = the same box through grid_sample."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(96, 128), mode="bilinear")
    boxes = crop_boxes(96, 128, 16, SCALE, RATIO, g)
    out = resample(img.expand(16, -1, -1, -1), boxes, 112)
    for i in range(16):
        t, l, hh, ww = (int(v[i]) for v in (boxes.top, boxes.left, boxes.height, boxes.width))
        ref = TF.resized_crop(img[0], t, l, hh, ww, [112, 112], interpolation=TF.InterpolationMode.BICUBIC,
                              antialias=True)
        inner = (slice(8, -8), slice(8, -8))  # away from the box edge, where grid_sample reads beyond the box
        assert (out[i][:, inner[0], inner[1]] - ref[:, inner[0], inner[1]]).abs().mean() < 0.01


def test_a_box_maps_onto_a_squashed_copy():
    """The box of the original, taken from the image squashed to S x S, covers the same content."""
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(150, 200), mode="bilinear")
    squashed = torch.nn.functional.interpolate(img, size=(128, 128), mode="bilinear", antialias=True)
    boxes = crop_boxes(150, 200, 8, SCALE, RATIO, g)
    a = resample(img.expand(8, -1, -1, -1), boxes, 64)
    b = resample(squashed.expand(8, -1, -1, -1), boxes, 64)
    assert (a - b).abs().mean() < 0.01


def test_flip_is_a_fair_coin_and_mirrors():
    crops = DeviceCrops(8, scale=(1, 1), ratio=(1, 1))
    ramp = torch.arange(16, dtype=torch.uint8).repeat(16, 1)[None, :, :, None].expand(2000, 16, 16, 3) * 16
    sizes = torch.full((2000, 2), 16)
    out = crops((ramp, sizes), torch.Generator().manual_seed(0))
    left_dark = out[:, 0, 4, 0] < out[:, 0, 4, -1]
    assert 0.45 < left_dark.float().mean() < 0.55


# --------------------------------------------------------------------------- packs


@pytest.fixture
def tree(tmp_path):
    return make_train_val_folders(tmp_path / "imgs", classes=3, per_class=8, val_per_class=3)


def test_pack_round_trips_pixels_sizes_and_labels(tree, tmp_path):
    folder = RobustImageFolder(tree / "train")
    dst = pack_folder(folder, tmp_path / "pack", size=32, progress=False)
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["count"] == meta["kept"] == 24 and meta["classes"] == folder.classes
    ds = PackedImages(dst, 16)
    (pixels, sizes), labels = ds[[0, 5, 23]]
    assert pixels.shape == (3, 32, 32, 3) and pixels.dtype == torch.uint8
    from PIL import Image

    for j, i in enumerate([0, 5, 23]):
        path, label = folder.samples[i]
        img = Image.open(path).convert("RGB")
        assert tuple(sizes[j].tolist()) == (img.height, img.width) and labels[j] == label
        want = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC))
        assert np.array_equal(pixels[j].numpy(), want)
    assert not list(tmp_path.glob(".pack*"))  # the temporary folder was renamed, nothing left behind


def test_pack_refuses_an_existing_folder_and_skips_or_names_a_bad_file(tree, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(PackError, match="already exists"):
        pack_folder(RobustImageFolder(tree / "train"), tmp_path / "taken", size=16, progress=False)
    bad = tree / "train" / "n00000001" / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(PackError, match="broken.JPEG"):
        pack_folder(RobustImageFolder(tree / "train"), tmp_path / "p1", size=16, progress=False)
    assert not (tmp_path / "p1").exists()
    dst = pack_folder(RobustImageFolder(tree / "train", on_bad_image="skip"), tmp_path / "p2", size=16,
                      progress=False)
    assert len(PackedImages(dst, 16)) == 24 and json.loads((dst / "meta.json").read_text())["skipped"]


def test_pack_command_then_pretraining_reads_the_pack(tree, tmp_path, capsys):
    from study.cli import main

    assert main(["pack", "--set", "data.name=imagefolder", "--set", f"data.root={tree}", "--set", "model.in_chans=3", "--dst",
                 str(tmp_path / "pack"), "--size", "24"]) == 0
    cfg = image_folder_config(tree, f"data.packed={tmp_path / 'pack'}")
    from study.data.datasets import build_datasets

    train, _ = build_datasets(cfg)
    assert isinstance(train, PackedImages)
    pretrain(cfg, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    # a pack of other images than data.root's is refused, naming what differs
    make_image_folder(tree / "train", classes=4, per_class=8)
    make_image_folder(tree / "val", classes=4, per_class=3, seed=1)
    with pytest.raises(PackError, match="other classes"):
        build_datasets(cfg)


def test_packed_run_resumes_exactly(tree, tmp_path):
    pack_folder(RobustImageFolder(tree / "train"), tmp_path / "pack", size=24, progress=False)
    cfg = image_folder_config(tree, f"data.packed={tmp_path / 'pack'}", "data.num_workers=1", "objective=cimle")
    pretrain(cfg, tmp_path / "full", progress=False)
    short = image_folder_config(tree, f"data.packed={tmp_path / 'pack'}", "data.num_workers=1", "objective=cimle", "epochs=1")
    pretrain(short, tmp_path / "part", progress=False)
    pretrain(cfg, tmp_path / "part", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_or_unfinished_pack_is_one_clear_error(tree, tmp_path):
    from study.data.datasets import build_datasets

    with pytest.raises(UserError, match="not a pack"):
        build_datasets(image_folder_config(tree, f"data.packed={tmp_path / 'nowhere'}"))
    with pytest.raises(UserError, match="data.packed"):
        image_folder_config(tree, "data.name=mnist", "model.in_chans=1", f"data.packed={tmp_path}")


def test_device_crops_normalise_into_the_imagenet_range():
    pixels = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = DeviceCrops(16)((pixels, torch.tensor([[300, 400]]).expand(64, 2)), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 16, 16) and out.dtype == torch.float32
    lo = (0 - 0.485) / 0.229
    hi = (1 - 0.406) / 0.225
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5 and math.isfinite(out.sum().item())
