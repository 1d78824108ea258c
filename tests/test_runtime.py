"""The runtime rules every command shares: precision, schedule, threads, checkpoints read safely."""

import math

import pytest
import torch

from conftest import tiny_overrides
from study.train.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from study.config import load_config
from study.methods.model import build_model
from study.utils.device import NoDevice, autocast, cpu_threads, resolve_device, seed_everything
from study.train.optim import warmup_cosine

# bf16 keeps 8 bits of mantissa; measured here: relative gaps 5e-4 (ls), 6e-4 (cimle), 3e-5 (mvae). The
# tolerance is 30x the largest: loose enough for other CPUs' kernels, tight enough to catch a wrong cast
BF16_LOSS_RTOL = 2e-2


class Payload:
    """An arbitrary pickled object, as a foreign checkpoint could carry."""


@pytest.mark.parametrize("objective", ["ls", "cimle", "mvae"])
def test_bf16_and_fp32_losses_of_one_step_agree(objective):
    cfg = load_config(None, tiny_overrides(f"objective={objective}", size=16, width=16))
    seed_everything(0)
    model = build_model(cfg)
    imgs = torch.randn(8, cfg.model.in_chans, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[:, ::2] = True
    losses = {}
    for precision in ("fp32", "bf16"):
        with autocast(precision, "cpu"):
            losses[precision] = model(imgs, mask, generator=torch.Generator().manual_seed(2)).loss.item()
    assert math.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=BF16_LOSS_RTOL)
    assert losses["bf16"] != losses["fp32"], "bf16 autocast did not take effect on CPU"


def test_one_autocast_rule():
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        autocast("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be"):
        autocast("fp8", "cpu")


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(NoDevice, match="--set device=cpu"):
            resolve_device("cuda")


def test_warmup_cosine_schedule():
    assert warmup_cosine(0.0, 1.0, 10, 2) == 0.0
    assert warmup_cosine(1.0, 1.0, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(2.0, 1.0, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(6.0, 1.0, 10, 2, min_lr=0.1) == pytest.approx(0.55)
    assert warmup_cosine(10.0, 1.0, 10, 2, min_lr=0.1) == pytest.approx(0.1)
    assert warmup_cosine(3.0, 1.0, 10, 0) < 1.0  # no warmup: decays from the first epoch


def test_cpu_threads_restores():
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_checkpoints_load_without_running_pickled_code(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {"model": {"w": torch.ones(2)}, "rng": [rng_state(gen)], "config": {"seed": 1}, "epoch": 0}
    save_checkpoint(tmp_path / "ok.pt", state)
    loaded = load_checkpoint(tmp_path / "ok.pt")  # numpy's RNG state is the one non-tensor object allowed
    set_rng_state(loaded["rng"][0], gen)
    assert torch.equal(loaded["model"]["w"], torch.ones(2))

    torch.save({"model": {}, "extra": Payload()}, tmp_path / "evil.pt")  # any other object: refused, not run
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_a_gpu_config_off_the_gpu_stops_with_the_reason(monkeypatch, capsys, tmp_path):
    from conftest import one_error_line
    from study.cli import main
    from study.utils import device as device_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 0, raising=False)
    code = main(["pretrain", "--config", "experiments/configs/in100-vit-t.yaml", "--out", str(tmp_path / "run")])
    one_error_line(capsys, code, "device=cuda", "no GPU is visible", "--set device=cpu")
    assert not (tmp_path / "run").exists()
    # a torch built for CUDA 13 on a CUDA 12.4 driver: the driver it needs and the build to install instead
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12040, raising=False)
    reason = device_module.why_no_cuda()
    assert "built for CUDA 13.0" in reason and ">= 580" in reason and "CUDA 12.4" in reason
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 0, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES=''" in device_module.why_no_cuda()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in device_module.why_no_cuda()
