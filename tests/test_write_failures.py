"""Failed writes (full disk, size limit) end in one ``error:`` line, keep what was there, and leave no debris.

A full disk is played by RLIMIT_FSIZE: with SIGXFSZ ignored, a write past the
limit fails with EFBIG where a full disk fails with ENOSPC, through the same
code paths (torch.save's stream writer, pandas, plain writes). Sizes are
deterministic, so the limits below sit between what must and must not fit.
"""

import csv
import errno
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from conftest import as_sets, one_error_line, tiny_overrides
from study.cli import main as cli_main
from study.config import load_config
from study.utils.errors import WriteError
from study.evaluation.results import append_rows, drop_stale_points, read_results
from study.train.loop import load_checkpoint, pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_overrides("checkpoint_every=1")
LIMIT = 16 << 10  # above config.yaml and metrics.jsonl (~1 KB), below a tiny checkpoint (~90 KB)


def _limited(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def run_limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    """``python -m study ARGS`` with every file it writes limited to ``limit`` bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "study", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          preexec_fn=_limited(limit), timeout=120)


@contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE in this process (Python ignores SIGXFSZ, so writes past it fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def the_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished one-epoch run (checkpoint of epoch 1); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    pretrain(load_config(None, TINY + ["epochs=1"]), out, progress=False)
    assert (out / "checkpoint.pt").stat().st_size > LIMIT
    return out


# --------------------------------------------------------------------------- pretrain


def test_pretrain_failing_at_its_first_checkpoint_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "run"
    proc = run_limited(LIMIT, "pretrain", "--quiet", "--out", str(out), *as_sets(TINY + ["epochs=2"]))
    line = the_error_line(proc)
    assert f"{out / 'checkpoint.pt'}" in line and "File too large" in line
    assert "no checkpoint was written" in line and "removed" in line
    assert not out.exists() and (tmp_path / "new").exists()  # only the folder the run made is gone


def test_pretrain_failing_at_its_config_in_an_existing_folder_keeps_the_folder_empty(tmp_path):
    with file_size_limit(256):  # below config.yaml, the first file a run writes
        with pytest.raises(WriteError) as info:
            pretrain(load_config(None, TINY + ["epochs=1"]), tmp_path, progress=False)
    message = str(info.value)
    assert f"{tmp_path / 'config.yaml'}" in message and "no checkpoint was written" in message
    assert "\n" not in message and sorted(os.listdir(tmp_path)) == []


def test_pretrain_failing_after_a_checkpoint_keeps_it_and_resumes(one_epoch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    longer = as_sets(TINY + ["epochs=3"])
    proc = run_limited(LIMIT, "pretrain", "--quiet", "--resume", "--out", str(out), *longer)
    line = the_error_line(proc)
    assert f"{out / 'checkpoint.pt'}" in line and "the checkpoint of epoch 1 is kept" in line and "--resume" in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 0
    assert not list(out.glob(".*.tmp"))

    assert cli_main(["pretrain", "--quiet", "--resume", "--out", str(out), *longer]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    epochs = [int(r["epoch"]) for r in pd.read_json(out / "metrics.jsonl", lines=True).to_dict("records")]
    assert epochs == [0, 1, 2]


def test_failed_metrics_append_leaves_no_half_row(tmp_path):
    from study.train.loop import _append_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "loss": 1.0}\n')
    before = path.read_bytes()
    with file_size_limit(len(before) + 10), pytest.raises(OSError) as info:
        _append_metrics(path, {"epoch": 1, "loss": 0.5, "lr": 1e-3, "images_per_sec": 100.0})
    assert info.value.errno == errno.EFBIG
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- export


def test_export_failing_at_its_weights(one_epoch, tmp_path):
    out = tmp_path / "export"
    proc = run_limited(1024, "export", "--checkpoint", str(one_epoch / "checkpoint.pt"), "--format", "timm",
                       "--out", str(out))
    line = the_error_line(proc)
    assert f"{out / 'model.safetensors'}" in line and "nothing was written" in line
    assert not out.exists()  # the folder the export made is taken back


# --------------------------------------------------------------------------- pack


def test_pack_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    from conftest import make_train_val_folders

    root = make_train_val_folders(tmp_path / "imgs", classes=3, per_class=8, val_per_class=2)
    dst = tmp_path / "pack"
    # 24 images of 64 x 64 x 3 bytes: 295 KB of pixels, above the 64 KB limit
    proc = run_limited(64 << 10, "pack", "--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set",
                       "model.in_chans=3", "--dst", str(dst), "--size", "64")
    line = the_error_line(proc)
    assert "images.npy" in line and "File too large" in line and "nothing was kept" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no pack, no half-written .packing folder


def test_build_in100_copy_on_a_full_disk_keeps_what_it_copied_and_finishes_on_rerun(tmp_path):
    src, dst = tmp_path / "in1k", tmp_path / "in100"
    subprocess.run([sys.executable, "-m", "study.data.fake_imagenet", "--out", str(src), "--synsets", "100",
                    "--train-per-class", "1", "--val-per-class", "1", "--min-side", "64", "--max-side", "64"],
                   check=True, capture_output=True, cwd=ROOT)
    args = ["build-in100", "--src", str(src), "--dst", str(dst), "--copy"]
    line = the_error_line(run_limited(1024, *args))  # every 64-px JPEG is above 1 KB
    assert ".JPEG" in line and str(dst) in line and "rerun the same command" in line, line
    assert not list(dst.rglob(".*.partial"))
    finished = subprocess.run([sys.executable, "-m", "study", *args], capture_output=True, text=True, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr
    assert len(list((dst / "train").rglob("*.JPEG"))) == 100


# --------------------------------------------------------------------------- the results table


def test_failed_append_keeps_the_table_and_saves_the_rows_aside(tmp_path, monkeypatch):
    table = tmp_path / "results.csv"
    append_rows(table, [{"metric": f"m{i}", "value": float(i), "note": "x" * 40} for i in range(100)])
    before = table.read_bytes()
    aside = tmp_path / "tmp"
    aside.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(aside))
    with file_size_limit(len(before) + 16), pytest.raises(WriteError) as info:
        append_rows(table, [{"metric": "new", "value": 1.0, "note": "y" * 40}, {"metric": "new", "value": 2.0}])
    message = str(info.value)
    assert f"cannot write {table}" in message and "the previous table is kept" in message and "\n" not in message
    assert table.read_bytes() == before
    [side] = aside.glob("results.unsaved-*.csv")
    assert str(side) in message
    assert list(read_results(side)["value"]) == [1.0, 2.0]
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*.tmp"))


def test_evaluate_whose_results_cannot_be_written(one_epoch, tmp_path, capsys, monkeypatch):
    table = tmp_path / "results.csv"
    with open(table, "w", newline="") as fh:  # a table larger than the limit: rewriting it fails
        writer = csv.writer(fh)
        writer.writerow(["metric", "value", "note"])
        writer.writerows([f"m{i}", i, "x" * 40] for i in range(400))
    before = table.read_bytes()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with file_size_limit(len(before) - 1024):
        code = cli_main(["evaluate", "--checkpoint", str(one_epoch / "checkpoint.pt"), "--protocols", "knn",
                         "--results", str(table), "--figures", str(tmp_path / "figures"), "--quiet"])
    line = one_error_line(capsys, code, str(table), "kept")
    assert table.read_bytes() == before
    sides = [p for p in tmp_path.glob("results.unsaved-*.csv") if str(p) in line]
    assert sides and all(set(read_results(p)["metric"]) >= {"knn_top1"} for p in sides)
    assert not list(tmp_path.glob("*.lock"))


def test_no_lock_file_stays_behind(one_epoch, tmp_path):
    table = tmp_path / "results.csv"
    append_rows(table, [{"sweep": "s", "point": "a", "metric": "m", "value": 1.0}])
    drop_stale_points(table, "s", ["b"])
    assert not list(tmp_path.glob("*.lock"))
    (tmp_path / "results.csv.lock").touch()  # left by an older writer: taken and removed
    append_rows(table, [{"metric": "m", "value": 2.0}])
    assert not list(tmp_path.glob("*.lock"))
    assert cli_main(["evaluate", "--checkpoint", str(one_epoch / "checkpoint.pt"), "--protocols", "knn",
                     "--results", str(table), "--figures", str(tmp_path / "figures"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["results.csv"]


def _append_many(table: str, worker: int, count: int) -> None:
    for i in range(count):
        append_rows(table, [{"metric": "m", "value": float(i), "worker": worker, "i": i}])


def test_concurrent_appends_keep_every_row_and_no_lock(tmp_path):
    table, workers, count = str(tmp_path / "results.csv"), 6, 25
    fork = multiprocessing.get_context("fork")  # the children need only pandas: no re-import of the package
    procs = [fork.Process(target=_append_many, args=(table, w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    rows = read_results(table)
    assert sorted(zip(rows["worker"], rows["i"])) == [(w, i) for w in range(workers) for i in range(count)]
    assert sorted(os.listdir(tmp_path)) == ["results.csv"]
