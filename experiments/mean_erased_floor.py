"""Least squares' loss floor on the mean-erased digits, and the loss its runs reach.

With the masked target patches' signs flipped with probability p, E[y | x] = (1 - 2p) E[y_true | x], and
least squares' best loss is E[y^2] - (1 - 2p)^2 E[E[y_true | x]^2]. At p = 0.5 that is E[y^2] whatever
the encoder knows (the floor); for p < 0.5 it lies between 4p(1 - p) E[y^2] (a perfect encoder) and
E[y^2]. This script computes E[y^2] on the training split (the model's per-patch normalised targets;
masks are uniform over patches) and reads each LS run's last-epoch loss from its metrics.jsonl.

    python experiments/mean_erased_floor.py --runs runs/mean_erased_cpu --out results/mean_erased_floor.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from study.config import load_config
from study.data.datasets import build_datasets
from study.evaluation.results import write_results
from study.methods.model import build_model
from study.utils.errors import UserError, run_command


def floor_rows(runs: Path) -> list[dict]:
    rows, second_moment = [], {}
    for config in sorted(runs.glob("*/run/config.yaml")):
        cfg = load_config(config)
        if cfg.objective != "ls":
            continue
        key = (cfg.data.name, cfg.model.patch_size, cfg.model.img_size)
        if key not in second_moment:
            train, _ = build_datasets(cfg)
            imgs = torch.stack([train[i][0] for i in range(len(train))])
            second_moment[key] = float(build_model(cfg).target(imgs).pow(2).mean())
        metrics = [json.loads(line) for line in (config.parent / "metrics.jsonl").read_text().splitlines()]
        p = cfg.data.sign_flip.p
        rows.append({"point": config.parent.parent.name, "seed": cfg.seed, "sign_flip_p": p,
                     "sign_flip_scope": cfg.data.sign_flip.scope if p > 0 else None,
                     "final_loss": metrics[-1]["loss"], "y2": second_moment[key],
                     "floor_low": 4 * p * (1 - p) * second_moment[key], "floor_high": second_moment[key]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/mean_erased_cpu"))
    parser.add_argument("--out", type=Path, default=Path("runs/mean_erased_floor.csv"))
    args = parser.parse_args(argv)

    def run() -> int:
        rows = floor_rows(args.runs)
        if not rows:
            raise UserError(f"no least-squares run under {args.runs}: run `make mean-erased` first, or pass --runs")
        frame = pd.DataFrame(rows)
        write_results(args.out, frame.assign(metric="final_loss", value=frame.final_loss))
        print(frame.groupby(["sign_flip_p", "sign_flip_scope"], dropna=False)[["final_loss", "floor_low",
                                                                                "floor_high"]].mean().round(4))
        print(f"wrote {args.out}")
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
