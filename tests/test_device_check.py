"""The GPU check script runs every one of its steps at a CPU size and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_every_step_at_a_cpu_size(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "device_check.sh"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["steps"]) == {"bench", "data", "train", "ddp", "sync_free", "compile", "finetune"}
    assert all("ok" in step for step in result["steps"].values()), result["steps"]
    bench = result["steps"]["bench"]["ok"]["image_noise"]["result"]["fp32"]
    assert bench["matmul_peak_flop_per_s"] > 0 and "ls" in bench["rows"]
    train = result["steps"]["train"]["ok"]
    assert train["ls"]["images_per_s"] > 0 and train["ls"]["poster_run_gpu_hours_one_gpu"] > 0
    assert result["steps"]["ddp"]["ok"]["backend"] == "gloo"
    assert result["steps"]["compile"]["ok"]["ls"]["compile"]["step_s"] > 0
    assert result["steps"]["finetune"]["ok"]["images_per_s"] > 0
    assert set(result["steps"]["sync_free"]["ok"]) == {"ls", "cimle", "mvae"}


def test_device_check_without_a_gpu_says_so():
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "device_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no GPU visible")
