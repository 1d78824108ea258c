"""build-in100 on fake ImageNet-1k trees: a flat val with its label file, --copy and its resumption,
--allow-missing keeping train and val on the same classes; and the fake-tree generator itself."""

from __future__ import annotations

import csv
import errno
import filecmp
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from study.cli import main as cli_main
from study.utils.errors import UserError
from study.data.fake_imagenet import EXTRA_WNIDS, main as fake_main, make_fake_imagenet
from study.data.imagenet100 import imagenet100_classes

IN100 = imagenet100_classes()
SIDES = (16, 28)  # small images keep every tree below a second


def _tree(root, synsets=104, train=1, val=1, **kw):
    make_fake_imagenet(root, synsets, train, val, seed=0, sides=SIDES, **kw)
    return root


def _val_labels(root):
    """``{file name: wnid}`` from the tree's LOC_val_solution.csv."""
    with open(root / "LOC_val_solution.csv", newline="") as f:
        return {row["ImageId"] + ".JPEG": row["PredictionString"].split()[0] for row in csv.DictReader(f)}


def _build(capsys, src, dst, *flags):
    rc = cli_main(["build-in100", "--src", str(src), "--dst", str(dst), *map(str, flags)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# --------------------------------------------------------------------------- flat val and its label file


def _csv_in_src(tmp_path):
    src = _tree(tmp_path / "in1k")
    return src, [], _val_labels(src)


def _kaggle_root(tmp_path):
    """Kaggle's layout: the csv three folders above ILSVRC/Data/CLS-LOC."""
    src = _tree(tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC")
    labels = _val_labels(src)
    (src / "LOC_val_solution.csv").rename(tmp_path / "kaggle" / "LOC_val_solution.csv")
    return src, [], labels


def _text_in_val(tmp_path):
    src = _tree(tmp_path / "in1k")
    labels = _val_labels(src)
    (src / "val" / "val_labels.txt").write_text("".join(f"{name} {wnid}\n" for name, wnid in labels.items()))
    (src / "LOC_val_solution.csv").unlink()
    return src, [], labels


def _text_flag_no_extension(tmp_path):
    src = _tree(tmp_path / "in1k")
    labels = _val_labels(src)
    lines = [f"{name[:-len('.JPEG')]}\t{wnid}\n" for name, wnid in labels.items()]
    (tmp_path / "labels.txt").write_text("".join(lines))
    (src / "LOC_val_solution.csv").unlink()
    return src, ["--val-labels", tmp_path / "labels.txt"], labels


def _one_wnid_per_line_flag(tmp_path):
    src = _tree(tmp_path / "in1k")
    labels = _val_labels(src)
    (tmp_path / "synsets.txt").write_text("".join(f"{labels[name]}\n" for name in sorted(labels)))
    (src / "LOC_val_solution.csv").unlink()
    return src, ["--val-labels", tmp_path / "synsets.txt"], labels


def _csv_flag(tmp_path):
    src = _tree(tmp_path / "in1k")
    labels = _val_labels(src)
    (src / "LOC_val_solution.csv").rename(tmp_path / "solution.csv")
    return src, ["--val-labels", tmp_path / "solution.csv"], labels


@pytest.mark.parametrize("layout", [_csv_in_src, _kaggle_root, _text_in_val, _text_flag_no_extension,
                                    _one_wnid_per_line_flag, _csv_flag],
                         ids=["csv-in-src", "csv-kaggle-root", "txt-in-val", "txt-flag", "wnid-lines-flag",
                              "csv-flag"])
def test_flat_val_is_sorted_into_class_folders_by_its_label_file(tmp_path, capsys, layout):
    src, flags, labels = layout(tmp_path)
    dst = tmp_path / "in100"
    rc, out, err = _build(capsys, src, dst, *flags)
    assert rc == 0, err
    assert sorted(os.listdir(dst / "train")) == sorted(os.listdir(dst / "val")) == sorted(IN100)
    assert (dst / "classes.txt").read_text().split() == sorted(IN100)
    linked = 0
    for wnid in IN100:
        for name in os.listdir(dst / "val" / wnid):
            link = dst / "val" / wnid / name
            assert link.is_symlink() and link.resolve() == (src / "val" / name).resolve()
            assert labels[name] == wnid
            linked += 1
    assert linked == 100 and "val: 100 images in 100 classes" in out


def test_flat_val_without_a_label_file_says_which_file_to_give(tmp_path, capsys):
    src = _tree(tmp_path / "in1k")
    (src / "LOC_val_solution.csv").unlink()
    rc, _, err = _build(capsys, src, tmp_path / "in100")
    line = _one_error_line(err)
    assert rc == 2 and "--val-labels" in line and "LOC_val_solution.csv" in line and "flat" in line
    assert not (tmp_path / "in100").exists()


@pytest.mark.parametrize("text", ["ILSVRC2012_val_00000001.JPEG 65\n", "65\n12\n"], ids=["caffe", "devkit"])
def test_class_numbers_instead_of_wnids_are_refused(tmp_path, capsys, text):
    src = _tree(tmp_path / "in1k")
    (tmp_path / "val.txt").write_text(text)
    rc, _, err = _build(capsys, src, tmp_path / "in100", "--val-labels", tmp_path / "val.txt")
    assert rc == 2 and "class numbers, not wnids" in _one_error_line(err)


# --------------------------------------------------------------------------- --copy


def test_copy_writes_files_and_a_rerun_finishes_an_interrupted_copy(tmp_path, capsys, monkeypatch):
    src, dst = _tree(tmp_path / "in1k"), tmp_path / "in100"
    real_copy, calls = shutil.copyfile, []

    def dies_halfway(source, dest, **kw):
        calls.append(dest)
        if len(calls) == 120:  # a kill in the middle of a file: half of it on disk
            with open(source, "rb") as f, open(dest, "wb") as g:
                g.write(f.read()[: os.path.getsize(source) // 2])
            raise KeyboardInterrupt
        return real_copy(source, dest, **kw)

    monkeypatch.setattr(shutil, "copyfile", dies_halfway)
    rc, _, err = _build(capsys, src, dst, "--copy")
    assert rc == 130 and "interrupted" in err
    labels = _val_labels(src)
    for split in ("train", "val"):  # no image under its real name is incomplete
        for rel in _files(dst / split):
            if not os.path.basename(rel).startswith("."):
                source = src / split / (rel if split == "train" else os.path.basename(rel))
                assert filecmp.cmp(source, dst / split / rel, shallow=False), rel
    monkeypatch.setattr(shutil, "copyfile", real_copy)

    rc, out, err = _build(capsys, src, dst, "--copy")
    assert rc == 0 and "finished the interrupted build" in out, err
    for wnid in IN100:
        train = dst / "train" / wnid
        assert not train.is_symlink() and os.listdir(train) == [f"{wnid}_0.JPEG"]
        assert filecmp.cmp(src / "train" / wnid / f"{wnid}_0.JPEG", train / f"{wnid}_0.JPEG", shallow=False)
        (name,) = os.listdir(dst / "val" / wnid)
        assert labels[name] == wnid and not (dst / "val" / wnid / name).is_symlink()
        assert filecmp.cmp(src / "val" / name, dst / "val" / wnid / name, shallow=False)
    everything = [dst / rel for rel in _files(dst)]
    assert not any(p.is_symlink() for p in everything)
    assert sorted(p.name for p in everything if p.name.startswith(".")) == []  # no partial copies, no marker
    rc, _, err = _build(capsys, src, dst, "--copy")
    assert rc == 2 and "not empty" in _one_error_line(err)  # a finished build is not silently redone


def test_where_symlinks_fail_the_error_says_copy_and_copy_needs_no_overwrite(tmp_path, capsys, monkeypatch):
    src, dst = _tree(tmp_path / "in1k", val_folders=True), tmp_path / "in100"

    def refused(self, *args, **kw):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(Path, "symlink_to", refused)
        rc, _, err = _build(capsys, src, dst)
    assert rc == 2 and "--copy" in _one_error_line(err)
    rc, out, err = _build(capsys, src, dst, "--copy")
    assert rc == 0 and "started the interrupted build" in out, err
    assert not any((dst / rel).is_symlink() for rel in _files(dst)) and len(_files(dst / "val")) == 100


# --------------------------------------------------------------------------- --allow-missing


@pytest.mark.parametrize("val_folders", [False, True], ids=["flat-val", "val-folders"])
def test_a_class_missing_from_one_split_is_dropped_from_both(tmp_path, capsys, val_folders):
    src, dst = _tree(tmp_path / "in1k", val_folders=val_folders), tmp_path / "in100"
    no_train, no_val = IN100[10], IN100[20]
    shutil.rmtree(src / "train" / no_train)
    for name, wnid in _val_labels(src).items():
        if wnid == no_val:
            (src / "val" / wnid / name if val_folders else src / "val" / name).unlink()

    rc, out, err = _build(capsys, src, dst, "--allow-missing")
    assert rc == 0, err
    kept = sorted(set(IN100) - {no_train, no_val})
    assert sorted(os.listdir(dst / "train")) == sorted(os.listdir(dst / "val")) == kept
    assert (dst / "classes.txt").read_text().split() == kept
    assert "dropped 2 classes" in out and "train: 98 images in 98 classes" in out

    rc, _, err = _build(capsys, src, tmp_path / "strict")
    line = _one_error_line(err)
    assert rc == 2 and "lacks 2 of the 100" in line and no_train in line and no_val in line
    assert not (tmp_path / "strict").exists()


def test_allow_missing_with_no_class_left_is_an_error(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "in1k" / split / "n00000001").mkdir(parents=True)
    rc, _, err = _build(capsys, tmp_path / "in1k", tmp_path / "in100", "--allow-missing")
    assert rc == 2 and "none of the 100 listed classes" in _one_error_line(err)


# --------------------------------------------------------------------------- the generator


def _digest(root):
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in _files(root)}


def test_fake_imagenet_has_imagenet_shape_and_is_deterministic(tmp_path):
    a = _tree(tmp_path / "a", train=2)
    train = sorted(os.listdir(a / "train"))
    extras = sorted(set(train) - set(IN100))
    assert len(train) == 104 and set(IN100) <= set(train)
    assert extras == sorted(EXTRA_WNIDS[:4]) and all(re.fullmatch(r"n\d{8}", w) for w in extras)
    assert sorted(os.listdir(a / "train" / IN100[0])) == [f"{IN100[0]}_0.JPEG", f"{IN100[0]}_1.JPEG"]
    val = sorted(os.listdir(a / "val"))
    assert val == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 105)]
    labels = _val_labels(a)
    assert sorted(labels) == val and sorted(labels.values()) == train  # one val image per class
    assert len(set(labels[v] for v in val[:10])) > 1  # classes interleave in the numbering
    sizes = {Image.open(a / "val" / v).size for v in val}
    assert all(SIDES[0] <= s <= SIDES[1] for size in sizes for s in size)
    assert any(w != h for w, h in sizes) and len(sizes) > 20

    assert _digest(_tree(tmp_path / "b", train=2)) == _digest(a)
    other = make_fake_imagenet(tmp_path / "c", 104, 2, 1, seed=1, sides=SIDES)
    assert other == {"train": 208, "val": 104} and _digest(tmp_path / "c") != _digest(a)


def test_fake_imagenet_classes_are_told_apart_by_their_pixels(tmp_path):
    root = _tree(tmp_path / "t", synsets=10, train=6, val=3)

    def features(path):
        pixels = np.asarray(Image.open(path).convert("RGB").resize((8, 8)), dtype=np.float32) / 255
        return np.concatenate([pixels.mean((0, 1)), pixels.std((0, 1))])

    wnids = sorted(os.listdir(root / "train"))
    centroids = np.stack([np.mean([features(p) for p in (root / "train" / w).iterdir()], 0) for w in wnids])
    labels = _val_labels(root)
    hits = [wnids[int(np.argmin(((centroids - features(root / "val" / n)) ** 2).sum(1)))] == w
            for n, w in labels.items()]
    assert np.mean(hits) > 0.5  # chance is 0.1


def test_fake_imagenet_command_line(tmp_path, capsys):
    out = tmp_path / "fake"
    args = ["--out", str(out), "--synsets", "3", "--train-per-class", "2", "--val-per-class", "1",
            "--min-side", "16", "--max-side", "20"]
    assert fake_main(args) == 0
    assert "wrote 6 train and 3 val images of 3 synsets" in capsys.readouterr().out
    assert sorted(os.listdir(out / "train")) == sorted(IN100[:3]) and len(os.listdir(out / "val")) == 3
    with pytest.raises(UserError, match="already holds a tree"):
        fake_main(args)
    assert fake_main([*args, "--overwrite", "--val-folders"]) == 0
    assert sorted(os.listdir(out / "val")) == sorted(IN100[:3])
    with pytest.raises(UserError, match="between 1 and 108"):
        fake_main(["--out", str(tmp_path / "x"), "--synsets", "109"])
