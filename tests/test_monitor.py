"""The k-NN monitor: logged every N epochs, the same weights as a run without it, refused where it cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from study.cli import main
from study.config import ConfigError, load_config
from study.evaluation.monitor import monitor_hooks
from study.train.checkpoint import load_checkpoint
from study.train.loop import pretrain
from tests.conftest import as_sets, one_error_line, tiny_overrides


def _cfg(*extra: str):
    return load_config(None, tiny_overrides("epochs=3", "objective=cimle", *extra))


def test_the_monitor_logs_at_its_epochs_and_leaves_the_weights_alone(tmp_path):
    watched = _cfg("monitor.knn_every=2", "monitor.train_images=16", "monitor.val_images=8", "monitor.k=5")
    pretrain(watched, tmp_path / "watched", progress=False, epoch_hooks=monitor_hooks(watched))
    pretrain(_cfg(), tmp_path / "plain", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()]
    assert [("monitor_knn_top1" in r) for r in rows] == [False, True, True]  # epoch 2, and the last
    for r in rows[1:]:
        assert 0.0 <= r["monitor_knn_top1"] <= 1.0 and r["monitor_seconds"] > 0 and r["monitor_share"] > 0
    a = load_checkpoint(tmp_path / "watched" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)  # the monitor draws from no training RNG


def test_the_monitor_reads_the_same_images_every_time():
    cfg = _cfg("monitor.knn_every=1", "monitor.train_images=10", "monitor.val_images=4")
    first, second = monitor_hooks(cfg)[0], monitor_hooks(cfg)[0]
    assert first.subset("train").indices == second.subset("train").indices
    assert len(first.subset("train")) == 10 and len(first.subset("val")) == 4


def test_a_monitor_asked_for_and_not_given_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="epoch_hooks"):
        pretrain(_cfg("monitor.knn_every=1"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_command_line_runs_the_monitor_and_resume_may_change_it(tmp_path, capsys):
    sets = as_sets(tiny_overrides("epochs=2", "monitor.knn_every=1", "monitor.train_images=16",
                                  "monitor.val_images=8"))
    assert main(["pretrain", "--out", str(tmp_path / "run"), *sets]) == 0
    assert "monitor_knn_top1" in capsys.readouterr().out
    more = as_sets(tiny_overrides("epochs=3", "monitor.knn_every=0"))
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--resume", *more]) == 0


@pytest.mark.parametrize("setting, words", [("monitor.knn_every=-1", "monitor.knn_every"),
                                            ("monitor.k=0", "monitor.k")])
def test_bad_monitor_settings_are_one_error_line(setting, words, capsys, tmp_path):
    code = main(["pretrain", "--out", str(tmp_path / "run"), *as_sets(tiny_overrides(setting))])
    one_error_line(capsys, code, words)
