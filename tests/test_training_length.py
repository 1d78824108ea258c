"""The training-length study: its sweep file and the paired analysis of its table at every snapshot."""

import itertools

import pandas as pd
import pytest

from study.studies.sweep import expand, load_sweep


def test_sweep_runs_five_arms_at_two_ratios_with_five_seeds():
    """LS on both models (plain decoder, head at z = 0), cIMLE per image (decoder input, head), per token."""
    points = expand(load_sweep("experiments/sweeps/training_length_cpu.yaml"))
    assert len(points) == 5 * 2 * 5
    assert {"objective=ls", "noise.block=head", "epochs=150"} <= set(points[0].overrides)
    assert "objective=ls" in points[-1].overrides and "noise.block=head" not in points[-1].overrides
    assert len({p.config for p in points}) == 50


def _table(tmp_path):
    """Sweep-shaped rows: LS and both cIMLE variants at 2 ratios, 3 seeds, snapshots 10 and 150."""
    rows = []
    for seed, ratio, epochs, encoder, pool in itertools.product(range(3), [0.75, 0.9], [10, 150],
                                                                 ["pretrained", "random"], ["mean", "cls"]):
        for objective, select in [("ls", "image"), ("cimle", "image"), ("cimle", "token")]:
            gap = {"ls": 0.0, "image": -0.05, "token": 0.01 * (epochs == 150)}[objective if objective == "ls" else select]
            for metric in ("knn_top1", "linear_top1"):
                rows.append(dict(objective=objective, cimle_select=select, mask_ratio=ratio, mask_kind="random",
                                 epochs=epochs, seed=seed, encoder=encoder, pool=pool, metric=metric,
                                 dataset="mnist", value=0.6 + 0.02 * seed + (gap if encoder == "pretrained" else -0.3)))
    pd.DataFrame(rows).to_csv(tmp_path / "training_length_cpu.csv", index=False)


def test_each_snapshot_is_paired_with_ls_at_its_own_epoch_and_ratio(tmp_path):
    from study.figures.training_length import training_length_rows, write_training_length
    from study.evaluation.results import read_results

    _table(tmp_path)
    curves, paired = training_length_rows(read_results(tmp_path / "training_length_cpu.csv"))
    paired = paired.set_index(["mask_ratio", "metric", "objective", "epochs"])
    token = paired.loc[(0.9, "knn_top1", "cimle-token", 150)]
    assert token.n == 3 and token.mean_diff == pytest.approx(1.0) and token.ci_low == pytest.approx(1.0)
    assert paired.loc[(0.75, "linear_top1", "cimle-token", 10)].mean_diff == pytest.approx(0.0, abs=1e-9)
    assert paired.loc[(0.75, "knn_top1", "cimle", 10)].mean_diff == pytest.approx(-5.0)
    assert curves.random.to_numpy() == pytest.approx(32.0)  # (0.6 + 0.02 * mean seed 1 - 0.3) in %
    first, second = write_training_length(tmp_path, tmp_path / "a"), write_training_length(tmp_path, tmp_path / "b")
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert "| 0.9 | per token | 150 | 3 | 63.0 | 62.0 | **+1.0 [+1.0, +1.0]** |" in (tmp_path / "a" / "training_length.md").read_text()
