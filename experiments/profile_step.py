"""Where a training step's time goes: torch.profiler's top operators of one LS (or cIMLE) step per precision.

    python experiments/profile_step.py --config experiments/configs/in100-vit-t.yaml --set device=cpu \\
        --batch 32 --precision fp32,bf16 --out results/bench/in100-vit-t-cpu-profile.txt

The step is the training loop's (``study.train.step.train_step``: mask, forward,
backward, AdamW) on the benchmark's fixed batch (``experiments.bench.variants.Trainer``),
warmed up, then profiled over ``--steps`` steps. The table groups by operator and sorts by self CPU time; the summary line splits the
step into matmul-like operators (whose FLOPs the benchmark counts) and the
rest (elementwise, norms, softmax, copies and casts, the optimizer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from experiments.bench.memory import quiet_stderr_fd  # noqa: E402
from experiments.bench.variants import Trainer  # noqa: E402
from study.config import load_config, with_overrides  # noqa: E402
from study.utils.errors import run_command  # noqa: E402
from study.utils.io import atomic_write_text  # noqa: E402
from study.utils.device import resolve_device  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::convolution_backward",
              "aten::mkldnn_convolution", "aten::_convolution")


def profile_precision(cfg, precision: str, batch: int, steps: int, k: int | None, rows: int) -> str:
    cfg = with_overrides(cfg, f"precision={precision}", f"optim.batch_size={batch}")
    device = resolve_device(cfg.device)
    m = cfg.model
    imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, device, imgs.to(device), compile_model=False)
    step = trainer.step_fn(k)
    step()
    step()
    with quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU]) as prof:  # no profiler chatter
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMUL_OPS)
    head = (f"== {cfg.objective}{'' if k is None else f' k={k}'}, {precision}, batch {batch}, "
            f"{steps} steps: {total / 1e3 / steps:.0f} ms/step self CPU; matmul-like operators "
            f"{100 * matmul / total:.0f}%, everything else {100 * (total - matmul) / total:.0f}%")
    return head + "\n" + averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="experiments/configs/in100-vit-t.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated (default fp32,bf16)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--k", type=int, default=None, help="profile cIMLE with k samples instead of LS")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)

    def run() -> int:
        cfg = load_config(args.config, args.overrides + (["objective=cimle"] if args.k else []))
        text = "\n\n".join(profile_precision(cfg, prec.strip(), args.batch, args.steps, args.k, args.rows)
                           for prec in args.precision.split(",") if prec.strip())
        print(text)
        if args.out:
            atomic_write_text(args.out, text + "\n")
        return 0

    return run_command(run, debug="--debug" in sys.argv)


if __name__ == "__main__":
    raise SystemExit(main())
