"""Per-epoch time outside the training steps: metrics row, checkpoint write and integrity hash, loader turnover.

    PYTHONPATH=. python experiments/epoch_overhead.py [--config FILE] [--epochs 4] [--set KEY=VALUE ...]

Runs a short pretraining with a checkpoint every epoch and prints, per epoch, the steps' time
(the row's ``seconds``) and the time from the end of one epoch's steps to the start of the
next (the end-of-epoch work), with the CPU model and the code it imported. The default is the
in100 ViT-T model (its ~25M-parameter decoder, so a checkpoint of its real size) on CPU in fp32,
with synthetic 224 px images and two one-step epochs' worth of data. Run it under PYTHONPATH of
another checkout to measure that code: it patches only ``_train_one_epoch`` and ``_end_epoch``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import study
import study.train.loop as loop
from study.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SETS = ["device=cpu", "precision=fp32", "data.name=synthetic", "data.synthetic.classes=2",
                "data.synthetic.per_class=2", "data.packed=null", "data.val_fraction=0.25", "data.num_workers=2", "data.augment=false",
                "optim.batch_size=2", "optim.effective_batch=null", "optim.accum_steps=1", "checkpoint_every=1",
                "monitor.knn_every=0", "optim.warmup_epochs=1"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def measure(cfg, out: Path) -> list[tuple[float, float]]:
    """(steps seconds, seconds outside the steps) for each epoch."""
    marks: list[list[float]] = []
    rows: list[dict] = []
    train, end = loop._train_one_epoch, loop._end_epoch

    def timed_train(*args, **kwargs):
        if marks:
            marks[-1].append(time.perf_counter())  # the previous epoch's end-of-epoch work is over
        row = train(*args, **kwargs)
        rows.append(dict(row))
        marks.append([time.perf_counter()])
        return row

    def timed_end(*args, **kwargs):
        end(*args, **kwargs)
        if len(rows) == cfg.epochs:
            marks[-1].append(time.perf_counter())

    loop._train_one_epoch, loop._end_epoch = timed_train, timed_end
    try:
        loop.pretrain(cfg, out, progress=False)
    finally:
        loop._train_one_epoch, loop._end_epoch = train, end
    return [(row["seconds"], mark[1] - mark[0]) for row, mark in zip(rows, marks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "experiments/configs/in100-vit-t.yaml"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--set", nargs="*", default=[], dest="sets")
    args = parser.parse_args()
    cfg = load_config(args.config, [*DEFAULT_SETS, f"epochs={args.epochs}", *args.sets])
    with tempfile.TemporaryDirectory() as tmp:
        epochs = measure(cfg, Path(tmp) / "run")
        size = (Path(tmp) / "run" / "checkpoint.pt").stat().st_size
    print(f"code: {Path(study.__file__).parent}  cpu: {cpu_model()}  checkpoint {size / 2**20:.0f} MiB")
    for i, (steps, outside) in enumerate(epochs):
        print(f"epoch {i + 1}: steps {steps:.3f} s  outside the steps {outside:.3f} s")
    middle = [outside for _, outside in epochs[:-1]] or [epochs[-1][1]]
    print(f"outside the steps: median {statistics.median(middle):.3f} s per intermediate epoch, "
          f"final epoch {epochs[-1][1]:.3f} s")


if __name__ == "__main__":
    main()
