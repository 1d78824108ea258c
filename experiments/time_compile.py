"""``compile: true`` beside eager: seconds per training step (mask, forward, backward, AdamW) of LS and cIMLE.

    python experiments/time_compile.py --config experiments/configs/cpu-small.yaml --steps 10

Each row builds the benchmark's trainer (``experiments.bench.variants.Trainer``) on one fixed batch and
times its first step (for ``compile`` that is the compilation); then ``--steps`` rounds step every row
once in turn (a shared host's load then slows all rows alike). Each row prints its median and its
first step's loss: eager and compiled start from the same weights, masks and noise, so the losses
agree up to the compiled kernels' rounding. cIMLE eager decodes its samples as
``cimle.decode`` says (``auto``: vmap on CPU); compiled, ``auto`` folds them into the batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experiments.bench.variants import Trainer  # noqa: E402
from study.config import load_config, with_overrides  # noqa: E402
from study.utils.device import host_cpu, resolve_device  # noqa: E402
from study.utils.errors import run_command  # noqa: E402

ROWS = [("ls", "auto", False), ("ls", "auto", True), ("cimle", "auto", False), ("cimle", "batched", False),
        ("cimle", "auto", True)]


def build_row(cfg, objective: str, decode: str, compiled: bool) -> tuple[Callable[[], torch.Tensor], float, float]:
    """The row's step, the seconds of its first call (for ``compile``: the compilation) and its loss."""
    cfg = with_overrides(cfg, f"objective={objective}", f"cimle.decode={decode}")
    device = resolve_device(cfg.device)
    m = cfg.model
    imgs = torch.randn(cfg.optim.batch_size, m.in_chans, m.img_size, m.img_size,
                       generator=torch.Generator().manual_seed(0)).to(device)
    step = Trainer(cfg, device, imgs, compile_model=compiled).step_fn()
    t0 = time.perf_counter()
    loss = step().item()
    return step, time.perf_counter() - t0, loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/cpu-small.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds after the first step (default 10)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(f"host: {host_cpu()}; torch {torch.__version__}; threads {torch.get_num_threads()}", flush=True)
    rows = [(row, *build_row(cfg, *row)) for row in ROWS]
    times: dict = {row: [] for row in ROWS}
    for _ in range(args.steps):  # round-robin: a busy host slows every row alike
        for row, step, _, _ in rows:
            t0 = time.perf_counter()
            step().item()
            times[row].append(time.perf_counter() - t0)
    for (objective, decode, compiled), _, first, loss in rows:
        median = statistics.median(times[(objective, decode, compiled)])
        print(f"{objective:6s} decode={decode:8s} compile={str(compiled):5s}  first step {first:7.2f} s  "
              f"median step {median:.3f} s  first loss {loss:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
