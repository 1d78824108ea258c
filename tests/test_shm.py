"""Too little /dev/shm for the loader's workers stops a run before training with one line naming both sizes."""

import shutil
from collections import namedtuple

import pytest
import torch

from conftest import one_error_line, tiny_overrides, as_sets
from study.cli import main as cli_main
from study.data import shm
from study.data.shm import SharedMemoryTooSmall, check_shared_memory, loader_shm_bytes

Usage = namedtuple("Usage", "total used free")


class Images:
    def __getitem__(self, index):
        return torch.zeros(3, 32, 32, dtype=torch.uint8), 1  # 3072 bytes and a label that collates into 8


def _free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shm.shutil, "disk_usage",
                        lambda path: Usage(free, 0, free) if str(path) == shm.SHM else real(path))


def test_the_estimate_is_workers_x_prefetch_x_batch_bytes():
    assert loader_shm_bytes(Images(), batch_size=10, workers=4) == 4 * 2 * 10 * (3 * 32 * 32 + 8)
    assert loader_shm_bytes(Images(), batch_size=10, workers=4, processes=2) == 2 * 4 * 2 * 10 * 3080
    assert loader_shm_bytes(Images(), batch_size=10, workers=0) == 0


def test_short_shared_memory_names_both_sizes_and_the_fixes(monkeypatch):
    _free(monkeypatch, 2**20)
    with pytest.raises(SharedMemoryTooSmall) as info:
        check_shared_memory(Images(), batch_size=512, workers=8)
    message = str(info.value)
    assert "24 MiB" in message and "1 MiB free" in message  # 8 x 2 x 512 x 3080 bytes
    assert "data.num_workers" in message and "--shm-size" in message
    check_shared_memory(Images(), batch_size=512, workers=0)  # no workers: nothing in shared memory
    _free(monkeypatch, 2**30)
    check_shared_memory(Images(), batch_size=512, workers=8)


def test_pretrain_stops_before_training(monkeypatch, tmp_path, capsys):
    _free(monkeypatch, 1000)
    out = tmp_path / "run"
    code = cli_main(["pretrain", "--out", str(out), "--quiet",
                     *as_sets(tiny_overrides("epochs=1", "data.num_workers=1", "device=cpu"))])
    one_error_line(capsys, code, "shared memory", "/dev/shm", "data.num_workers", "--shm-size")
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
