"""Keep the MNIST completions figure's checkpoints: weights-only copies of the
``mnist_completions_cpu`` sweep's runs (least squares, per-token cIMLE, one-z-per-image
cIMLE and the Masked VAE at ratio 0.9, 60 epochs, seed 0) in
``results/checkpoints/mnist_{ls,cimle_token,cimle_image,mvae}.pt``, and print each
run's k-NN accuracy beside the efficiency study's row for the same objective, seed
and epoch (the same training; on another host they may differ by an image or two,
docs/reproducibility.md).

    python -m study sweep experiments/sweeps/mnist_completions_cpu.yaml --no-report
    python experiments/mnist_completions.py [--runs runs/mnist_completions_cpu] [--out results/checkpoints]

``make completions`` runs both and redraws ``figures/mnist_completions``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.train.checkpoint import save_weights_only  # noqa: E402
from study.evaluation.setup import load_models  # noqa: E402
from study.evaluation.results import read_results  # noqa: E402

VARIANTS = ("ls", "cimle_token", "cimle_image", "mvae")


def variant(cfg) -> str:
    return f"cimle_{cfg.cimle.select}" if cfg.objective == "cimle" else cfg.objective


def knn_row(table, cfg) -> float | None:
    """The efficiency table's k-NN top-1 (cls pool) for this run's objective, selection, seed and epochs."""
    rows = table[(table.objective == cfg.objective) & (table.seed == cfg.seed) & (table.epochs == cfg.epochs)
                 & (table.metric == "knn_top1") & (table.encoder == "pretrained") & (table["pool"] == "cls")]
    if cfg.objective == "cimle":
        rows = rows[rows.cimle_select == cfg.cimle.select]
    return float(rows.value.iloc[0]) if len(rows) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/mnist_completions_cpu")
    p.add_argument("--results", default="runs/mnist_completions_cpu.csv", help="the sweep's k-NN rows")
    p.add_argument("--efficiency", default="results/efficiency_cpu.csv")
    p.add_argument("--out", default="results/checkpoints")
    args = p.parse_args(argv)
    found = {}
    for ckpt in sorted(Path(args.runs).glob("*/run/checkpoint.pt")):
        cfg, state, _ = load_models(ckpt, which=())
        found[variant(cfg)] = (ckpt, cfg, state)
    missing = [v for v in VARIANTS if v not in found]
    if missing:
        print(f"error: no run of {', '.join(missing)} under {args.runs}; run "
              "`python -m study sweep experiments/sweeps/mnist_completions_cpu.yaml` first", file=sys.stderr)
        return 2
    ours = read_results(args.results) if Path(args.results).is_file() else None
    efficiency = read_results(args.efficiency) if Path(args.efficiency).is_file() else None
    for name in VARIANTS:
        ckpt, cfg, state = found[name]
        out = Path(args.out) / f"mnist_{name}.pt"
        save_weights_only(out, state)
        line = f"{out} <- {ckpt}"
        if ours is not None:
            here = knn_row(ours[ours.point == ckpt.parents[1].name], cfg)  # runs/<sweep>/<point>/run/
            there = knn_row(efficiency, cfg) if efficiency is not None else None
            line += f"  k-NN {here}" + (f" (efficiency study: {there})" if there is not None else "")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
