"""Pretraining on a folder of unlabelled images (``data.labels: none``), and the protocols that refuse it."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_folder_config, one_error_line
from study.cli import main as cli_main
from study.config import ConfigError, load_config
from study.data.datasets import build_datasets
from study.data.image_folders import DataError

ROOT = Path(__file__).resolve().parents[1]
# every depth, upper-case suffixes and JPEG among PNGs; notes.txt is not an image
IMAGES = ["a.png", "b.PNG", "x/c.png", "x/d.jpg", "x/y/z/e.png", "w/f.png", "w/g.png", "w/v/h.png"]
TINY_YAML = """\
epochs: 1
model: {img_size: 16, patch_size: 4, in_chans: 3, embed_dim: 16, depth: 1, num_heads: 2,
        decoder_dim: 16, decoder_depth: 1, decoder_heads: 2}
optim: {batch_size: 4, warmup_epochs: 1}
noise: {dim: 4}
cimle: {k: 2}
"""


def make_unlabelled_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, rel in enumerate(IMAGES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG" if rel.endswith(".jpg") else "PNG")
    (root / "x" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory):
    """``python -m study pretrain`` run for one epoch on a nested folder of unlabelled images."""
    tmp = tmp_path_factory.mktemp("unlabelled")
    images = make_unlabelled_folder(tmp / "images")
    config = tmp / "tiny.yaml"
    config.write_text(TINY_YAML)
    run = tmp / "run"
    cmd = [sys.executable, "-m", "study", "pretrain", "--config", str(config), "--set", "data.name=imagefolder",
           "--set", f"data.root={images}", "--set", "data.labels=none", "--out", str(run), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return images, run


def test_every_image_at_any_depth_is_a_training_image(tmp_path):
    images = make_unlabelled_folder(tmp_path / "images")
    train, val = build_datasets(image_folder_config(images, "data.labels=none"))
    want = sorted(str(images / rel) for rel in IMAGES)
    assert sorted(path for path, _ in train.samples) == want
    assert set(train.targets) == {0} and train.classes == []
    assert [path for path, _ in val.samples] == [path for path, _ in train.samples]  # nothing held out
    x, y = train[0]
    assert tuple(x.shape) == (3, 16, 16) and y == 0


def test_pretrain_command_writes_a_checkpoint(unlabelled_run):
    _, run = unlabelled_run
    assert (run / "checkpoint.pt").is_file()
    assert load_config(run / "config.yaml").data.labels == "none"


@pytest.mark.parametrize("protocols", ["knn,linear", "finetune"])
def test_evaluate_refuses_protocols_that_need_labels(unlabelled_run, tmp_path, capsys, protocols):
    _, run = unlabelled_run
    code = cli_main(["evaluate", "--checkpoint", str(run), "--protocols", protocols, "--quiet",
                     "--results", str(tmp_path / "results.csv")])
    one_error_line(capsys, code, "need class labels", "data.labels=none", "--set data.root=",
                   "data.labels=folders")
    assert not (tmp_path / "results.csv").exists()


def test_pack_holds_every_image(unlabelled_run, tmp_path, capsys):
    images, _ = unlabelled_run
    pack = tmp_path / "pack"
    code = cli_main(["pack", "--set", "data.name=imagefolder", "--set", f"data.root={images}",
                     "--set", "data.labels=none", "--set", "model.in_chans=3", "--dst", str(pack), "--size", "16"])
    assert code == 0, capsys.readouterr().err
    train, _ = build_datasets(image_folder_config(images, "data.labels=none", f"data.packed={pack}"))
    assert len(train) == len(IMAGES) and set(train.targets) == {0}


def test_labels_none_needs_imagefolder():
    with pytest.raises(ConfigError, match="data.labels=none .*needs data.name=imagefolder"):
        load_config(None, ["data.name=mnist", "data.labels=none"])


def test_images_without_class_folders_point_to_labels_none(tmp_path):
    images = tmp_path / "flat"
    images.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(images / "a.png")
    with pytest.raises(DataError, match="data.labels=none"):
        build_datasets(image_folder_config(images))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files at any depth"):
        build_datasets(image_folder_config(tmp_path / "empty", "data.labels=none"))


def test_sweep_point_refuses_before_pretraining(unlabelled_run, tmp_path):
    from study.studies.notebook import execute_notebook

    images, _ = unlabelled_run
    (tmp_path / "base.yaml").write_text(TINY_YAML)
    overrides = ["data.name=imagefolder", f"data.root={images}", "data.labels=none"]
    with pytest.raises(Exception, match="need class labels"):
        execute_notebook(ROOT / "notebooks" / "run.py", tmp_path / "run.ipynb", cwd=ROOT, parameters=dict(
            config=str(tmp_path / "base.yaml"), overrides=overrides, out=str(tmp_path / "run"),
            results=str(tmp_path / "results.csv"), protocols="knn", sweep="tiny", point="p"))
    assert not (tmp_path / "run").exists()
