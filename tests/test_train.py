"""The pretraining loop: outputs, exact resume after SIGKILL, divergence handling, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from study.cli import main as cli_main
from study.config import load_config
from study.train import RunExists, TrainingDiverged, load_checkpoint, pretrain

TINY = [
    "data.name=synthetic", "data.synthetic_classes=2", "data.synthetic_per_class=40", "data.augment=false",
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2",
    "optim.batch_size=8", "optim.warmup_epochs=1", "noise.dim=4", "cimle.k=3", "mask.ratio=0.5",
]


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


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, one_thread):
    epochs = 8
    overrides = TINY + ["objective=cimle", f"epochs={epochs}", "data.synthetic_per_class=120"]
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
    proc.send_signal(signal.SIGKILL)
    proc.wait()
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
    import study.models as models

    real_build = models.build_model
    calls = {"n": 0}

    def build_poisoned(cfg):
        model = real_build(cfg)
        forward = model.forward

        def poisoned(imgs, mask, generator=None):
            out = forward(imgs, mask, generator=generator)
            calls["n"] += 1
            if calls["n"] > 12:  # 64 train images / batch 8: the second epoch runs calls 9-16
                out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(models, "build_model", build_poisoned)
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
