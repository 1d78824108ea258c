"""The pretraining loop: outputs, exact resume after SIGKILL, divergence handling, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_overrides
from study.cli import main as cli_main
from study.config import ConfigError, load_config
from study.train.loop import RunExists, TrainingDiverged, load_checkpoint, pretrain

TINY = tiny_overrides(size=16, width=16, per_class=40, k=3)


def tiny(*extra):
    return load_config(None, TINY + list(extra))


@pytest.mark.parametrize("objective", ["ls", "cimle", "mvae"])
def test_pretrain_writes_run_folder(tmp_path, objective):
    cfg = tiny(f"objective={objective}", "epochs=2")
    row = pretrain(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("loss", "lr", "images_per_sec", "data_wait_frac"):
        assert key in rows[-1]
    assert rows[-1] == row
    assert load_config(tmp_path / "config.yaml") == cfg
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and state["config"]["objective"] == objective
    assert {"model", "optimizer", "scaler", "rng"} <= set(state)


def test_existing_run_needs_resume(tmp_path):
    cfg = tiny("epochs=1")
    pretrain(cfg, tmp_path, progress=False)
    with pytest.raises(RunExists, match="--resume"):
        pretrain(cfg, tmp_path, progress=False)
    with pytest.raises(ValueError, match="cimle.k"):
        pretrain(tiny("epochs=1", "cimle.k=2"), tmp_path, resume=True, progress=False)


@pytest.fixture
def one_thread():
    """Bitwise equality across processes needs the same reduction order: one thread everywhere."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(previous)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_signal_mid_epoch_then_resume_matches_uninterrupted(tmp_path, one_thread, sig):
    """SIGKILL (nothing runs) and SIGTERM (a cluster's pre-emption: the run stops, says how to resume)."""
    epochs = 8
    overrides = TINY + ["objective=cimle", f"epochs={epochs}", "data.synthetic.per_class=120"]
    reference = tmp_path / "reference"
    pretrain(load_config(None, overrides), reference, progress=False)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "study", "pretrain", "--out", str(killed), "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=one_thread)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.3)  # well inside a later epoch
    proc.send_signal(sig)
    proc.wait()
    if sig == signal.SIGTERM:
        err = proc.stderr.read().decode().strip().splitlines()
        assert proc.returncode == 143 and len(err) == 1 and err[0].startswith("error: stopped by SIGTERM"), err
        assert "--resume" in err[0] and "keeps its checkpoint after" in err[0], err
    interrupted_at = load_checkpoint(killed / "checkpoint.pt")["epoch"]
    assert interrupted_at < epochs - 1, "the run finished before it could be killed; make it longer"

    pretrain(load_config(None, overrides), killed, resume=True, progress=False)
    a = load_checkpoint(reference / "checkpoint.pt")["model"]
    b = load_checkpoint(killed / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logged = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(epochs))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, 12, float("nan"))  # 64 train images / batch 8: the second epoch runs calls 9-16
    cfg = tiny("epochs=3")
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 2"):
        pretrain(cfg, tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_reports_config_errors(tmp_path, capsys):
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--set", "mask.ratio=1.5"])
    assert code == 2
    assert "mask.ratio" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- divergence, temp files, logs, extension


def _poison(monkeypatch, after_calls: int, factor: float):
    """Multiply the model's loss by ``factor`` from forward call ``after_calls + 1`` on."""
    import study.train.loop as train

    real_build = train.build_model
    calls = {"n": 0}

    def build_poisoned(cfg):
        model = real_build(cfg)
        forward = model.forward

        def poisoned(imgs, mask, **kwargs):
            out = forward(imgs, mask, **kwargs)
            calls["n"] += 1
            if calls["n"] > after_calls:
                out.loss = out.loss * factor
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(train, "build_model", build_poisoned)
    return calls


def test_divergence_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    _poison(monkeypatch, after_calls=2, factor=float("nan"))  # 8 steps per epoch: inside epoch 1
    with pytest.raises(TrainingDiverged) as info:
        pretrain(tiny("epochs=3"), tmp_path, progress=False)
    assert "No checkpoint was written" in str(info.value) and "kept" not in str(info.value)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_loss_growing_a_hundredfold_stops_the_run(tmp_path, monkeypatch):
    _poison(monkeypatch, after_calls=8, factor=1000.0)  # epoch 2 on: 1000 x the first epoch's loss
    with pytest.raises(TrainingDiverged, match="grew from .* at epoch 2.*max_loss_growth=100") as info:
        pretrain(tiny("epochs=4"), tmp_path, progress=False)
    assert "checkpoint of epoch 1" in str(info.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_loss_growth_limit_is_configurable(tmp_path, monkeypatch):
    calls = _poison(monkeypatch, after_calls=8, factor=1000.0)
    for limit in ("null", "5000"):
        calls["n"] = 0
        pretrain(tiny("epochs=2", f"optim.max_loss_growth={limit}"), tmp_path / limit, progress=False)
        assert load_checkpoint(tmp_path / limit / "checkpoint.pt")["epoch"] == 1
    calls["n"] = 0
    with pytest.raises(TrainingDiverged, match="max_loss_growth=500 "):
        pretrain(tiny("epochs=2", "optim.max_loss_growth=500"), tmp_path / "500", progress=False)
    with pytest.raises(ConfigError, match="optim.max_loss_growth"):
        tiny("optim.max_loss_growth=0.5")


def test_resume_and_start_remove_stale_temp_files(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny("epochs=1"), run, progress=False)
    stale = [run / ".checkpoint.pt.k2j3h4.tmp", run / ".metrics.jsonl.abcd.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    pretrain(tiny("epochs=1"), run, resume=True, progress=False)
    assert not any(path.exists() for path in stale)
    assert (run / "checkpoint.pt").is_file()
    fresh = tmp_path / "fresh"  # a kill before the first checkpoint left only a temp file
    fresh.mkdir()
    (fresh / ".checkpoint.pt.zz9.tmp").write_bytes(b"x")
    pretrain(tiny("epochs=1"), fresh, progress=False)
    assert [p.name for p in fresh.glob(".*.tmp")] == []


def test_redirected_pretrain_log_has_one_plain_line_per_epoch(tmp_path, one_thread):
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "study", "pretrain", "--out", str(tmp_path / "run")]
    for item in TINY + ["epochs=3"]:
        cmd += ["--set", item]
    with open(log, "wb") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=one_thread, check=True)
    text = log.read_bytes().decode()
    assert "\r" not in text
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], text
    for word in ("loss", "lr", "img/s", "left"):
        assert all(word in line for line in epochs), epochs


def test_resume_with_more_epochs_extends_the_run(tmp_path, capsys):
    from study.train.optim import lr_at

    pretrain(tiny("epochs=2"), tmp_path, progress=False)
    row = pretrain(tiny("epochs=4"), tmp_path, resume=True, progress=True)
    assert "extending" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0, 1, 2, 3] and logged[-1] == row
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 3 and state["config"]["epochs"] == 4
    assert load_config(tmp_path / "config.yaml").epochs == 4
    # the lr follows the 4-epoch schedule: the last step of epoch 4 (8 steps per epoch)
    cfg = tiny("epochs=4")
    base = cfg.optim.blr * cfg.optim.batch_size / 256
    assert row["lr"] == pytest.approx(lr_at(3 + 7 / 8, cfg, base))
    with pytest.raises(ValueError, match="epochs: 4 \\(checkpoint\\) vs 3 \\(now\\)"):
        pretrain(tiny("epochs=3"), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="mask.ratio"):
        pretrain(tiny("epochs=6", "mask.ratio=0.75"), tmp_path, resume=True, progress=False)
