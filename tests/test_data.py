"""Data module: image folders and bad files, the ImageNet-100 builder, bundled digits,
the synthetic mode-not-mean dataset, batched augmentation, channel checks."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from study.config import load_config
from study.data.datasets import (
    BadImageError,
    RobustImageFolder,
    build_datasets,
    build_eval_datasets,
    random_resized_crop,
    stratified_split,
)
from study.utils.errors import UserError
from study.data.imagenet100 import build_imagenet100, imagenet100_classes
from study.data.imagenet100 import main as in100_main
from study.data.synthetic_images import SyntheticImageGenerator, patchify, unpatchify

# --------------------------------------------------------------------------- helpers


def _png(path, seed, size=12):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _folder_tree(root, per_class=3):
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", seed=100 * c + i)


def _folder_cfg(root, *extra):
    return load_config(None, ["data.name=imagefolder", f"data.root={root}", "model.img_size=8",
                              "model.patch_size=4", "model.in_chans=3", *extra])


# --------------------------------------------------------------------------- image folders


def test_imagefolder_shapes_and_labels(tmp_path):
    _folder_tree(tmp_path)
    train, val = build_datasets(_folder_cfg(tmp_path))
    assert len(train) == 6 and len(val) == 6 and train.num_classes == 2
    x, y = train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert sorted({val[i][1] for i in range(len(val))}) == [0, 1]
    imgs, labels = next(iter(DataLoader(val, batch_size=6)))
    assert imgs.shape == (6, 3, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    e1, _ = build_eval_datasets(_folder_cfg(tmp_path))
    assert torch.equal(e1[0][0], e1[0][0])  # eval transform is deterministic


def test_imagefolder_without_split_folders_is_split(tmp_path):
    for c in ("a", "b"):
        for i in range(5):
            _png(tmp_path / c / f"{i}.png", seed=i)
    train, val = build_datasets(_folder_cfg(tmp_path, "data.val_fraction=0.2"))
    assert len(train) == 8 and len(val) == 2
    assert not {s for s, _ in train.samples} & {s for s, _ in val.samples}


def test_unreadable_image_error_names_file(tmp_path):
    _folder_tree(tmp_path)
    bad = tmp_path / "train" / "cat" / "broken.JPEG"
    bad.write_bytes(b"this is not a jpeg" * 10)
    train, _ = build_datasets(_folder_cfg(tmp_path))
    index = [s for s, _ in train.samples].index(str(bad))
    with pytest.raises(BadImageError, match="broken.JPEG") as info:
        train[index]
    assert str(bad) in str(info.value)


def test_unreadable_image_skipped_and_counted(tmp_path):
    _folder_tree(tmp_path)
    bad = tmp_path / "train" / "cat" / "broken.JPEG"
    bad.write_bytes(b"\x00garbage")
    train, _ = build_datasets(_folder_cfg(tmp_path, "data.on_bad_image=skip"))
    index = [s for s, _ in train.samples].index(str(bad))
    with pytest.warns(UserWarning, match="broken.JPEG"):
        x, y = train[index]
    assert x.shape == (3, 8, 8)
    assert train.num_skipped == 1 and train.skipped_files == [str(bad)]
    train[index]  # known bad: not read again, not counted twice
    assert train.num_skipped == 1


def test_skip_count_crosses_dataloader_workers(tmp_path):
    _folder_tree(tmp_path)
    (tmp_path / "train" / "dog" / "bad1.JPEG").write_bytes(b"junk")
    (tmp_path / "train" / "dog" / "bad2.JPEG").write_bytes(b"junk")
    train, _ = build_datasets(_folder_cfg(tmp_path, "data.on_bad_image=skip"))
    n = sum(x.shape[0] for x, _ in DataLoader(train, batch_size=2, num_workers=2))
    assert n == len(train) == 8
    assert train.num_skipped == 2


def test_imagenet100_restricts_classes_and_names_missing(tmp_path):
    wnids = imagenet100_classes()[:2]
    for w in wnids + ["n99999999"]:
        _png(tmp_path / w / "a.png", seed=1)
    ds = RobustImageFolder(tmp_path, classes=wnids)
    assert ds.classes == sorted(wnids) and len(ds) == 2
    with pytest.raises(FileNotFoundError, match="n00000001"):
        RobustImageFolder(tmp_path, classes=wnids + ["n00000001"])
    cfg = load_config(None, ["data.name=imagenet100", f"data.root={tmp_path}", "model.img_size=8",
                             "model.patch_size=4", "model.in_chans=3"])
    with pytest.raises(FileNotFoundError, match="build-in100"):
        build_datasets(cfg)


# --------------------------------------------------------------------------- ImageNet-100 builder


def test_class_list_has_100_unique_wnids():
    wnids = imagenet100_classes()
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)


def _fake_in1k(src, wnids, files=2):
    for split in ("train", "val"):
        for w in wnids:
            d = src / split / w
            d.mkdir(parents=True)
            for i in range(files):
                (d / f"{w}_{i}.JPEG").touch()


def test_build_imagenet100_links_listed_classes_only(tmp_path):
    listed = imagenet100_classes()[:3]
    src, dst = tmp_path / "in1k", tmp_path / "in100"
    _fake_in1k(src, listed + ["n00000042"])
    with pytest.raises(UserError, match=imagenet100_classes()[3]):
        build_imagenet100(src, dst)
    assert not dst.exists()  # nothing created when the check fails
    assert build_imagenet100(src, dst, allow_missing=True).counts == {"train": 6, "val": 6}
    for split in ("train", "val"):
        assert sorted(os.listdir(dst / split)) == sorted(listed)
        link = dst / split / listed[0]
        assert link.is_symlink() and link.resolve() == (src / split / listed[0]).resolve()
    # a full build over an explicit list; refusal and overwrite of a non-empty dst
    with pytest.raises(UserError, match="not empty"):
        build_imagenet100(src, dst, classes=listed)
    assert build_imagenet100(src, dst, classes=listed[:2], overwrite=True).counts == {"train": 4, "val": 4}
    assert sorted(os.listdir(dst / "train")) == sorted(listed[:2])
    assert (src / "train" / listed[2]).is_dir()  # src untouched by overwrite


def test_build_imagenet100_flat_val_and_cli(tmp_path, capsys):
    listed = imagenet100_classes()[:2]
    src = tmp_path / "in1k"
    for w in listed:
        (src / "train" / w).mkdir(parents=True)
        (src / "train" / w / "x.JPEG").touch()
    (src / "val").mkdir()
    (src / "val" / "ILSVRC2012_val_00000001.JPEG").touch()
    with pytest.raises(UserError, match="no class folders.*--val-labels"):
        build_imagenet100(src, tmp_path / "out", allow_missing=True)
    with pytest.raises(UserError, match="lacks 98"):
        in100_main(["--src", str(src), "--dst", str(tmp_path / "out"), "--splits", "train"])
    rc = in100_main(["--src", str(src), "--dst", str(tmp_path / "out"), "--splits", "train", "--allow-missing"])
    assert rc == 0 and "train: 2 images in 2 classes" in capsys.readouterr().out


# --------------------------------------------------------------------------- bundled digits


@pytest.mark.parametrize("name,n", [("mnist", 5000), ("digits", 1797)])
def test_bundled_digits(name, n):
    cfg = load_config(None, [f"data.name={name}", "data.augment=false"])
    train, val = build_datasets(cfg)
    assert len(train) + len(val) == n and abs(len(val) - 0.2 * n) <= 10
    x, y = train[0]
    assert x.shape == (1, 28, 28) and 0 <= y <= 9 and train.num_classes == 10
    mean, std = train.mean[0], train.std[0]
    pixels = train._fixed * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert abs(float(train._fixed.mean())) < 1e-3 and abs(float(train._fixed.std()) - 1) < 1e-2
    # deterministic split, disjoint, stratified
    train2, val2 = build_datasets(cfg)
    assert torch.equal(val.labels, val2.labels) and torch.equal(val._fixed, val2._fixed)
    assert torch.bincount(val.labels).min() >= 0.15 * n / 10


def test_split_is_deterministic_and_disjoint():
    labels = torch.arange(10).repeat(7)
    tr, va = stratified_split(labels, 0.3)
    tr2, va2 = stratified_split(labels, 0.3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(set(tr.tolist()) | set(va.tolist())) == 70 and not set(tr.tolist()) & set(va.tolist())
    assert torch.bincount(labels[va]).tolist() == [2] * 10


def test_digits_augmentation_is_random_and_batched():
    train, _ = build_datasets(load_config(None, ["data.name=digits", "model.img_size=16", "model.patch_size=4"]))
    a = train.__getitems__([0, 1, 2])
    b = train.__getitems__([0, 1, 2])
    assert a[0][0].shape == (1, 16, 16) and [y for _, y in a] == [y for _, y in b]
    # 8-px digits: one image gets the same (whole-image) crop twice now and then; all three hardly ever do
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    ev, _ = build_eval_datasets(load_config(None, ["data.name=digits", "model.img_size=16", "model.patch_size=4"]))
    assert torch.equal(ev[5][0], ev[5][0])


def test_channel_mismatch_names_both():
    with pytest.raises(ValueError, match=r"1-channel.*in_chans=3"):
        build_datasets(load_config(None, ["data.name=mnist", "model.in_chans=3"]))
    with pytest.raises(ValueError, match=r"3-channel.*in_chans=1"):
        build_datasets(load_config(None, ["data.name=imagefolder", "data.root=/nonexistent"]))


# --------------------------------------------------------------------------- batched crop


def test_random_resized_crop_identity_and_bounds():
    x = torch.rand(3, 1, 12, 12)
    assert torch.allclose(random_resized_crop(x, 12, scale=(1, 1), ratio=(1, 1)), x, atol=1e-5)
    ramp = torch.linspace(0, 1, 24).expand(4, 1, 24, 24).contiguous()  # value = column
    out = random_resized_crop(ramp, 24, scale=(0.25, 0.25), ratio=(1, 1), generator=torch.Generator().manual_seed(0))
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert torch.all(span < 0.55) and torch.all(span > 0.4)  # a 12-px window of a 24-px ramp (~11.5/23)
    flipped = random_resized_crop(ramp[:1].expand(64, 1, 24, 24), 24, scale=(1, 1), ratio=(1, 1), hflip=True)
    increasing = flipped[:, 0, 0, -1] > flipped[:, 0, 0, 0]
    assert 0 < int(increasing.sum()) < 64


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_shapes():
    g = SyntheticImageGenerator(3, 16, 4, in_chans=2)
    a, b = g.generate(5, seed=1), g.generate(5, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, g.generate(5, seed=2).images)
    assert a.images.shape == (15, 2, 16, 16) and a.signs.shape == (15, 16)
    assert torch.bincount(a.labels).tolist() == [5, 5, 5]
    assert torch.equal(unpatchify(patchify(a.images, 4), 4), a.images)
    assert torch.equal(SyntheticImageGenerator(3, 16, 4, in_chans=2).patterns, g.patterns)


def test_synthetic_modes_differ_not_means():
    g = SyntheticImageGenerator(4, 16, 4, mean_shift=0.0)
    d = g.generate(300, seed=0)
    means = torch.stack([d.images[d.labels == c].mean(0) for c in range(4)])
    assert means.pow(2).mean(dim=(1, 2, 3)).sqrt().max() < 0.1  # every class mean ~ 0
    # ...yet a single patch names its class: |correlation| with P_c
    patches = patchify(d.images, 4).reshape(-1, 16)
    corr = patches @ g.patterns.reshape(4, 16).T
    labels = d.labels.repeat_interleave(16)
    assert (corr.abs().argmax(1) == labels).float().mean() > 0.99
    # oracle helpers agree with the generator's own labels
    mode_ids = g.patch_mode_labels(d.labels, d.signs)
    assert (g.nearest_mode(patchify(d.images, 4)) == mode_ids).float().mean() > 0.99
    assert g.plausible_modes(d.labels).shape == (1200, 2, 1, 4, 4)
    x, y = g.sample_patches(50, torch.Generator().manual_seed(0))
    assert x.shape == (50, 1, 4, 4) and (g.nearest_mode(x) == y).all()

    shifted = SyntheticImageGenerator(4, 16, 4, mean_shift=1.0)
    d1 = shifted.generate(300, seed=0)
    means1 = torch.stack([d1.images[d1.labels == c].mean(0) for c in range(4)])
    diffs = (means1[:, None] - means1[None]).pow(2).mean(dim=(2, 3, 4)).sqrt()
    assert diffs[~torch.eye(4, dtype=torch.bool)].min() > 0.5  # cue * sqrt(2) / 4 per pixel


def test_synthetic_bayes_floor_matches_the_posterior_mean_predictor():
    g = SyntheticImageGenerator(4, 28, 7, cue=2.0, distractor=1.0)
    d = g.generate(500, seed=3)
    patches = patchify(d.images, 7).reshape(2000, 16, 49)  # [n, L, D]
    visible, masked = patches[:, :4], patches[:, 4:]
    n_vis = 4
    # E[g | visible]: Gaussian posterior from the visible patches' distractor coordinates
    proj = (visible @ g.distractor_dirs.T).sum(1)  # [n, M]
    g_hat = proj / (n_vis + g.noise_std**2 / g.distractor**2)
    pred = (g_hat @ g.distractor_dirs)[:, None, :]  # E[masked | visible], the same for every class
    mse = (masked - pred).pow(2).mean().item()
    assert mse == pytest.approx(g.bayes_floor(n_vis), rel=0.02)
    # ...and a predictor that also knows each masked patch's sign reaches the mode floor
    signs = d.signs[:, 4:].float()[..., None]
    known = pred + g.cue * signs * g.patterns.reshape(4, 49)[d.labels][:, None]
    assert (masked - known).pow(2).mean().item() == pytest.approx(g.mode_floor(n_vis), rel=0.02)
    assert g.mode_floor(n_vis) < g.bayes_floor(n_vis) / 3
    # the distractor is shared by the image, so it is what least squares can learn
    assert g.bayes_floor(n_vis) < g.bayes_floor(0)
    with pytest.raises(ValueError, match="cannot hold"):
        SyntheticImageGenerator(4, 8, 2)


def test_synthetic_datasets_from_config():
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic.classes=3", "data.synthetic.per_class=10",
                             "model.img_size=16", "model.patch_size=4", "model.in_chans=3"])
    train, val = build_datasets(cfg)
    assert len(train) == 24 and len(val) == 6 and train.num_classes == 3
    x, y = train[0]
    assert x.shape == (3, 16, 16) and isinstance(y, int)
    assert not torch.equal(train[0][0], train[0][0])  # augment: fresh draw of the same class
    assert torch.equal(val[0][0], val[0][0])
    e_train, _ = build_eval_datasets(cfg)
    assert torch.equal(e_train[0][0], e_train[0][0])
    assert torch.equal(build_eval_datasets(cfg)[0].data.images, e_train.data.images)


# --------------------------------------------------------------------------- bad files found before training


def _single_folder_with_bad_val_image(root):
    """A folder of class folders (split by data.val_fraction) whose one bad file falls in the val split."""
    for c in ("a", "b"):
        for i in range(5):
            _png(root / c / f"{i}.png", seed=10 * i + len(c))
    _, val = build_datasets(_folder_cfg(root, "data.val_fraction=0.2"))
    bad = val.samples[0][0]
    with open(bad, "wb") as fh:
        fh.write(b"\x89PNG truncated")
    return bad


def test_bad_image_in_the_val_split_stops_pretraining_up_front(tmp_path):
    from study.train.loop import pretrain

    bad = _single_folder_with_bad_val_image(tmp_path / "imgs")
    cfg = _folder_cfg(tmp_path / "imgs", "data.val_fraction=0.2", "optim.batch_size=4", "epochs=1",
                      "optim.warmup_epochs=1", "model.embed_dim=8", "model.num_heads=2", "model.decoder_dim=8",
                      "model.decoder_heads=2")
    with pytest.raises(BadImageError, match="val split") as info:
        pretrain(cfg, tmp_path / "run", progress=False)
    assert bad in str(info.value) and "on_bad_image=skip" in str(info.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_bad_image_in_the_val_split_is_skipped_when_asked(tmp_path):
    from study.data.datasets import check_images

    bad = _single_folder_with_bad_val_image(tmp_path / "imgs")
    train, val = build_datasets(_folder_cfg(tmp_path / "imgs", "data.val_fraction=0.2", "data.on_bad_image=skip"))
    with pytest.warns(UserWarning, match="1 unreadable image"):
        assert check_images({"train": train, "val": val}) == 1
    assert val.skipped_files == [bad] and train.num_skipped == 0
