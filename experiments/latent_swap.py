"""The latent-swap diagnostic (study.evaluation.latent_swap) of every run of the k-axis sweeps:
how much each trained sampler's own loss grows when its latent is another image's.

Reads ``runs/<sweep>/*/run/checkpoint.pt`` of the sweeps named and writes the tidy table
(objective, cimle_select, noise_block, k, seed, dataset, metric, value) to ``--out``, a run at a
time: each run's rows replace that run's rows there (dataset and point), the other runs' rows stay,
so a rerun of one sweep's points leaves the other sweep's rows in the committed table.

    python experiments/latent_swap.py [--runs runs/k_axis_cpu runs/k_axis_synthetic_cpu] \\
        [--out results/k_axis_latent_swap.csv]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.data.datasets import build_eval_datasets  # noqa: E402
from study.evaluation.latent_swap import latent_swap  # noqa: E402
from study.evaluation.setup import load_models  # noqa: E402
from study.evaluation.results import append_rows  # noqa: E402

SAMPLERS = ("ls", "cimle")  # the Masked VAE's loss reads the masked content through its variational encoder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["runs/k_axis_cpu", "runs/k_axis_synthetic_cpu"])
    p.add_argument("--out", default="results/k_axis_latent_swap.csv")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one reduction order: the same rows on every rerun
    checkpoints = [c for r in args.runs for c in sorted(Path(r).glob("*/run/checkpoint.pt"))]
    if not checkpoints:
        print(f"error: no checkpoint under {', '.join(args.runs)}; run `make k-axis` (its sweeps) first",
              file=sys.stderr)
        return 2
    datasets = {}
    for i, ckpt in enumerate(checkpoints):
        cfg, _, models = load_models(ckpt)
        if cfg.objective not in SAMPLERS:
            continue
        key = (cfg.data.name, str(cfg.data.synthetic))
        if key not in datasets:
            datasets[key] = build_eval_datasets(cfg)[1]
        start = time.perf_counter()
        values = latent_swap(models["pretrained"], cfg, datasets[key])
        base = {"objective": cfg.objective, "cimle_select": cfg.cimle.select, "noise_block": str(cfg.noise.block),
                "k": cfg.cimle.k, "seed": cfg.seed, "dataset": cfg.data.name, "mask_ratio": cfg.mask.ratio,
                "epochs": cfg.epochs, "point": ckpt.parents[1].name}
        append_rows(args.out, [{**base, "metric": name, "value": value} for name, value in values.items()],
                    replace={"dataset": base["dataset"], "point": base["point"]})
        print(f"{i + 1}/{len(checkpoints)} {ckpt.parents[1].name}: swap gain {values['swap_gain']:+.4f} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
