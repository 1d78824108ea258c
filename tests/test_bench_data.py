"""bench-data prints per-core rates for both pipelines, measured on the same images in one run."""

from __future__ import annotations

import json

from conftest import make_image_folder
from study.cli import main


def test_bench_data_prints_both_pipelines_and_the_cores_they_need(tmp_path, capsys):
    make_image_folder(tmp_path / "imgs" / "train", classes=2, per_class=8)
    make_image_folder(tmp_path / "imgs" / "val", classes=2, per_class=2, seed=1)
    out = tmp_path / "bench.json"
    sets = ["--set", "data.name=imagefolder", "--set", f"data.root={tmp_path / 'imgs'}", "--set", "model.in_chans=3",
            "--set", "model.img_size=16", "--set", "model.patch_size=4"]
    assert main(["bench-data", *sets, "--images", "16", "--batch", "8", "--size", "24", "--rate", "1000",
                 "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "folder (PIL decode + crop + flip)" in text and "packed (gather + crops)" in text and "cores for 1,000/s" in text
    r = json.loads(out.read_text())
    for key in ("folder_images_per_s_per_core", "packed_gather_images_per_s_per_core", "crops_images_per_s"):
        assert r[key] > 0
    assert r["folder_cores_needed"] == 1000 / r["folder_images_per_s_per_core"]
    assert r["host"]["cpu"] and r["images"] == 16


def test_bench_data_refuses_bad_flags_and_in_memory_data(capsys):
    assert main(["bench-data", "--images", "0"]) == 2
    assert "--images: must be an integer >= 1" in capsys.readouterr().err
    assert main(["bench-data"]) == 2  # the default config is MNIST, held in memory
    assert "bench-data times image folders" in capsys.readouterr().err
