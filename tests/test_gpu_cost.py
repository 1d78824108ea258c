"""experiments/gpu_cost.py's arithmetic on the tiny CPU config: counted FLOPs, the projection's scaling, the CSV."""

from __future__ import annotations

import csv

import pytest

from conftest import one_error_line
from experiments.gpu_cost import (encoder_flops_per_image, images_per_epoch, main, project_hours,
                                  step_flops_per_image)
from study.config import load_config

SMALL = "experiments/configs/cpu-small.yaml"


def _cfg(*overrides: str):
    return load_config(SMALL, ["device=cpu", "precision=fp32", *overrides])


def test_cimle_costs_more_per_image_than_ls_and_the_count_is_per_image():
    ls, cimle = step_flops_per_image(_cfg("objective=ls")), step_flops_per_image(_cfg("objective=cimle"))
    assert 0 < ls < cimle
    # k more decodes for the selection: more than LS, less than k + 1 LS steps
    assert cimle < (_cfg().cimle.k + 1) * ls
    assert step_flops_per_image(_cfg("objective=ls"), batch=4) == pytest.approx(ls, rel=1e-6)
    # forward only, no decoder: less than a training step's work
    assert 0 < encoder_flops_per_image(_cfg()) < ls


def test_hours_scale_as_one_over_gpus_and_utilisation():
    wall1, gpu_h1 = project_hours(1e18, 989e12, 0.3, 1)
    wall8, gpu_h8 = project_hours(1e18, 989e12, 0.3, 8)
    assert wall1 == pytest.approx(1e18 / (989e12 * 0.3) / 3600)
    assert wall8 == pytest.approx(wall1 / 8) and gpu_h8 == pytest.approx(gpu_h1)
    assert project_hours(1e18, 989e12, 0.6, 1)[0] == pytest.approx(wall1 / 2)


def test_an_epoch_counts_whole_effective_batches():
    cfg = load_config("experiments/configs/in100-vit-t.yaml", ["device=cpu"])
    assert images_per_epoch(cfg, 126_689) == 30 * 4096
    assert images_per_epoch(_cfg(), 1000) == 3 * 256


def test_the_script_writes_its_csv(tmp_path, capsys):
    out = tmp_path / "cost.csv"
    assert main(["--configs", SMALL, "--train-images", "1000", "--gpus", "1", "2", "--mfu", "0.25", "0.5",
                 "--monitor-every", "10", "--monitor-train", "100", "--monitor-val", "50", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    train = [r for r in rows if r["item"] == "train"]
    assert len(train) == 3 * 2 * 2 * 2  # objectives x GPU kinds x MFUs x GPU counts
    by = {(r["objective"], r["gpu"], float(r["mfu"]), int(r["gpus"])): float(r["wall_hours"]) for r in train}
    ls = by[("ls", "A100", 0.25, 1)]
    assert by[("ls", "A100", 0.25, 2)] == pytest.approx(ls / 2, rel=1e-4)
    assert by[("ls", "A100", 0.5, 1)] == pytest.approx(ls / 2, rel=1e-4)
    assert by[("cimle", "A100", 0.25, 1)] > ls
    monitor = [r for r in rows if r["item"] == "knn_monitor"]
    assert {r["objective"] for r in monitor} == {"ls", "cimle", "mvae"}
    ls_row = next(r for r in train if r["objective"] == "ls")
    ls_monitor = next(r for r in monitor if r["objective"] == "ls")
    # one monitoring (150 encoder forwards + the [50, D] @ [D, 100] k-NN matmul) against 10 epochs of 3 x 256 images
    once = float(ls_monitor["flops_per_image"]) * 150 + 2 * 50 * 100 * _cfg().model.embed_dim
    assert float(ls_monitor["share_of_training"]) == pytest.approx(
        once / (float(ls_row["flops_per_image"]) * 768 * 10), rel=1e-4)
    assert "| cpu-small | 48x1 | cimle k=8 |" in capsys.readouterr().out
    assert "| cpu-small | 48x1 | cimle k=8 |" in out.with_suffix(".md").read_text()


def test_bad_input_is_one_error_line(tmp_path, capsys):
    one_error_line(capsys, main(["--mfu", "1.5", "--out", str(tmp_path / "x.csv")]), "--mfu")
    one_error_line(capsys, main(["--configs", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "x.csv")]),
                   "not found")
    assert not (tmp_path / "x.csv").exists()
