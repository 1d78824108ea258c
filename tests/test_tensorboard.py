"""The optional TensorBoard log holds metrics.jsonl's scalars; without the extra the package still trains."""

import json
import sys

import pytest

from conftest import as_sets, tiny_overrides
from study.cli import main as cli_main
from study.config import ConfigError, load_config
from study.train.loop import pretrain

TINY = tiny_overrides("objective=cimle", width=16, decoder_width=8, per_class=16, k=3)


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_file_holds_the_metrics_rows(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = load_config(None, TINY + ["epochs=3", "logging.tensorboard=true"])
    pretrain(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(tmp_path / "tensorboard")
    for key in ("loss", "lr", "images_per_sec", "dist_gap"):
        assert f"train/{key}" in scalars, sorted(scalars)
    assert len(scalars) == len(rows[0]) - 1  # every key but the epoch, which is the step
    for tag, points in scalars.items():
        key = tag.removeprefix("train/")
        assert [s for s, _ in points] == [1, 2, 3]
        assert [v for _, v in points] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert all(r["dist_gap"] > 0 for r in rows)  # k = 3 distinct samples: the farthest is farther


def test_resume_drops_the_redone_epochs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import study.train.loop

    save = study.train.loop.save_checkpoint

    def killed_at_third_checkpoint(path, state, **kwargs):
        if "optimizer" in state and state["epoch"] == 2:
            raise KeyboardInterrupt  # epoch 3 is in metrics.jsonl and TensorBoard, not in the checkpoint
        save(path, state, **kwargs)

    cfg = load_config(None, TINY + ["epochs=3", "logging.tensorboard=true"])
    monkeypatch.setattr(study.train.loop, "save_checkpoint", killed_at_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path, progress=False)
    monkeypatch.setattr(study.train.loop, "save_checkpoint", save)
    pretrain(cfg, tmp_path, resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = _scalars(tmp_path / "tensorboard")["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    # logging does not change the run, so it may differ at resume
    pretrain(load_config(None, TINY + ["epochs=3"]), tmp_path, resume=True, progress=False)


def test_trains_without_the_extra_and_names_it_when_asked(tmp_path, monkeypatch, capsys):
    # as if TensorBoard were not installed: importing it fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    pretrain(load_config(None, TINY + ["epochs=1"]), tmp_path / "plain", progress=False)
    assert not (tmp_path / "plain" / "tensorboard").exists()
    with pytest.raises(ConfigError, match=r"pip install -e '.\[tensorboard\]'"):
        pretrain(load_config(None, TINY + ["epochs=1", "logging.tensorboard=true"]), tmp_path / "tb",
                 progress=False)
    assert not (tmp_path / "tb").exists()  # stopped before writing anything
    args = ["pretrain", "--out", str(tmp_path / "cli"), "--quiet", "--set", "logging.tensorboard=true"]
    assert cli_main(args + as_sets(TINY + ["epochs=1"])) == 2
    assert "tensorboard" in capsys.readouterr().err
