"""The device check's in-process steps on the training step itself: no host sync, compile beside eager.

Each returns a JSON-ready dict; ``experiments/device_check.py`` runs them after the subprocess steps.
On a GPU they run the in100 model at a GPU batch; ``tiny`` runs them at a CPU size (the tests).
"""

from __future__ import annotations

import time

import torch

from study.config import load_config
from study.methods.model import build_model
from study.train.step import train_step, training_state

IN100 = "experiments/configs/in100-vit-t.yaml"


def _state(objective: str, device: torch.device, tiny_model: list[str]):
    """A training state of the in100 config (tiny: ``tiny_model``) and a fixed batch on ``device``."""
    cuda = device.type == "cuda"
    cfg = load_config(IN100, [f"objective={objective}", f"device={device.type}"]
                      + (["optim.batch_size=128"] if cuda else ["precision=fp32", *tiny_model]))
    torch.manual_seed(0)
    state = training_state(cfg, build_model(cfg).to(device), device)
    m = cfg.model
    imgs = torch.randn(cfg.optim.batch_size, m.in_chans, m.img_size, m.img_size, device=device)  # [B, C, H, W]
    return state, imgs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_free_steps(device: torch.device, tiny_model: list[str]) -> dict:
    """A step of every objective, after two warm-up steps, under ``torch.cuda.set_sync_debug_mode("error")``:
    a step that reads a value back to the host raises here. CPU has no such mode (the tests count syncs)."""
    out = {}
    for objective in ("ls", "cimle", "mvae"):
        state, imgs = _state(objective, device, tiny_model)
        for _ in range(2):  # lazy initialisation (cuBLAS handles, the optimizer's state) may sync once
            train_step(state, imgs)
        _sync(device)
        if device.type != "cuda":
            out[objective] = {"checked": False, "why": "set_sync_debug_mode exists on CUDA only"}
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(state, imgs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        _sync(device)
        out[objective] = {"checked": True, "syncs": 0}
    return out


def compile_vs_eager(device: torch.device, tiny_model: list[str], steps: int) -> dict:
    """Per objective: the first step's seconds (compilation) and the median step after it, eager and compiled."""
    out = {}
    objectives = ("ls", "cimle") if device.type == "cuda" else ("ls",)  # on CPU compiling cIMLE takes minutes
    for objective in objectives:
        row = {}
        for mode in ("eager", "compile"):
            state, imgs = _state(objective, device, tiny_model)
            if mode == "compile":
                state.net = torch.compile(state.model)
            t0 = time.perf_counter()
            train_step(state, imgs)
            _sync(device)
            first, times = time.perf_counter() - t0, []
            for _ in range(steps):
                t0 = time.perf_counter()
                train_step(state, imgs)
                _sync(device)
                times.append(time.perf_counter() - t0)
            row[mode] = {"first_step_s": first, "step_s": sorted(times)[len(times) // 2],
                         "images_per_s": imgs.shape[0] / sorted(times)[len(times) // 2]}
        row["compile_speedup"] = row["eager"]["step_s"] / row["compile"]["step_s"]
        out[objective] = row
    return out
