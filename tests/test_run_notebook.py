"""The sweep's run notebook (notebooks/run.py) on a tiny config: one pretraining, its evaluation rows."""

from pathlib import Path

import pandas as pd

from study.notebook import execute_notebook
from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_run_notebook_evaluates_decoder_protocols_once_and_pooled_ones_per_pool(tmp_path):
    (tmp_path / "base.yaml").write_text("objective: ls\nepochs: 1\n")
    results = tmp_path / "results.csv"
    execute_notebook(ROOT / "notebooks" / "run.py", tmp_path / "run.ipynb", cwd=ROOT, parameters=dict(
        config=str(tmp_path / "base.yaml"), overrides=tiny_overrides(), out=str(tmp_path / "run"),
        results=str(results), protocols="knn,completion", pools="cls,mean", random_baseline_objectives="ls",
        sweep="tiny", point="ls_s0"))
    table = pd.read_csv(results)
    knn = table[table.metric == "knn_top1"]
    assert sorted(zip(knn.encoder, knn["pool"])) == [("pretrained", "cls"), ("pretrained", "mean"),
                                                      ("random", "cls"), ("random", "mean")]
    completion = table[table.protocol == "completion"]
    assert len(completion) > 0 and completion["pool"].isna().all()
    assert not completion.duplicated(["encoder", "metric"]).any()  # once per point, not once per pool
    assert set(table.point) == {"ls_s0"} and set(table.sweep) == {"tiny"}
