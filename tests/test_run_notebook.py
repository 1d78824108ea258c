"""The sweep's run notebook (notebooks/run.py) on a tiny config: one pretraining, its evaluation rows."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from study.studies.notebook import execute_notebook
from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, **parameters) -> None:
    (tmp_path / "base.yaml").write_text("objective: ls\nepochs: 1\noptim:\n  warmup_epochs: 1\n")
    execute_notebook(ROOT / "notebooks" / "run.py", tmp_path / "run.ipynb", cwd=ROOT, parameters=dict(
        config=str(tmp_path / "base.yaml"), overrides=tiny_overrides(), out=str(tmp_path / "run"),
        results=str(tmp_path / "results.csv"), sweep="tiny", point="ls_s0", **parameters))


def _old_rows(results: Path) -> None:
    """A row already in the file the notebook appends to (a sweep gives each point a file of its own)."""
    pd.DataFrame([{"sweep": "tiny", "point": "other", "metric": "knn_top1", "value": 0.5, "protocol": "old"}]
                 ).to_csv(results, index=False)


def test_run_notebook_evaluates_finetune_and_decoder_protocols_once_and_pooled_ones_per_pool(tmp_path):
    # ls is not among the objectives, random_baseline=True evaluates the random-init encoder anyway
    _run(tmp_path, protocols="knn,finetune,completion", pools="cls,mean", random_baseline_objectives="cimle",
         random_baseline=True)
    table = pd.read_csv(tmp_path / "results.csv")
    for protocol in ("finetune", "completion"):  # once per point, not once per pool
        rows = table[table.protocol == protocol]
        assert len(rows) > 0 and not rows.duplicated(["encoder", "metric"]).any(), protocol
        assert set(rows.encoder) == {"pretrained", "random"}, protocol
    knn = table[(table.metric == "knn_top1") & (table.knn_k == 20)]  # one row per k: the headline k's
    assert sorted(zip(knn.encoder, knn["pool"])) == [("pretrained", "cls"), ("pretrained", "mean"),
                                                      ("random", "cls"), ("random", "mean")]
    assert table[table.protocol == "completion"]["pool"].isna().all()
    assert set(table[table.protocol == "finetune"]["pool"]) == {"mean"}  # the finetune preset's pool
    assert set(table.point) == {"ls_s0"} and set(table.sweep) == {"tiny"}


def test_rows_of_each_evaluation_are_kept_when_a_later_one_fails(tmp_path):
    results = tmp_path / "results.csv"
    _old_rows(results)
    # ls is among the objectives, random_baseline=False skips the random-init encoder anyway;
    # the second pool is not one, so the point fails after the first pool's evaluation
    with pytest.raises(Exception, match="pool must be one of"):
        _run(tmp_path, protocols="knn", pools="cls,nopool", random_baseline_objectives="ls",
             random_baseline=False)
    table = pd.read_csv(results)
    mine = table[table.point == "ls_s0"]
    assert sorted(set(mine.metric)) == ["knn_seconds", "knn_top1"]
    assert set(mine.encoder) == {"pretrained"} and set(mine["pool"]) == {"cls"}
    assert len(table[table.point == "other"]) == 1


def test_a_failed_protocol_keeps_the_others_rows_and_fails_the_point(tmp_path):
    from study.config import config_to_dict, load_config
    from study.methods.model import build_model
    from study.train.loop import pretrain

    (tmp_path / "base.yaml").write_text("objective: ls\nepochs: 1\noptim:\n  warmup_epochs: 1\n")
    cfg = load_config(tmp_path / "base.yaml", tiny_overrides())
    pretrain(cfg, tmp_path / "run", progress=False)
    # a snapshot whose cls features are finite but at the float32 limit: the linear probe's loss is not
    # finite (its BatchNorm sums them), k-NN's cosine still gives rows
    diverged = build_model(cfg).state_dict()
    diverged["encoder.norm.weight"] = torch.zeros_like(diverged["encoder.norm.weight"])
    diverged["encoder.norm.bias"] = torch.full_like(diverged["encoder.norm.bias"], 3e38)
    (tmp_path / "run" / "snapshots").mkdir(exist_ok=True)
    torch.save({"model": diverged, "config": config_to_dict(cfg), "epoch": 0},
               tmp_path / "run" / "snapshots" / "epoch_0001.pt")
    results = tmp_path / "results.csv"
    _old_rows(results)
    with pytest.raises(Exception) as info:
        _run(tmp_path, protocols="knn,linear", pools="cls", snapshots=True)
    table = pd.read_csv(results)
    mine = table[table.point == "ls_s0"]
    assert sorted(set(mine.metric)) == ["knn_seconds", "knn_top1"] and set(mine.protocol) == {"knn"}
    assert all(Path(c).name == "epoch_0001.pt" for c in mine.checkpoint)
    assert len(table[table.point == "other"]) == 1
    assert "protocol linear failed" in str(info.value)
