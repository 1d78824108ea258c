"""Context-Completion at k = 8 and sample diversity on the same-mean synthetic images.

Reads the default-point runs (the config of ``experiments/configs/synthetic.yaml``
at mean shift 0; least squares and per-token cIMLE, every seed) found in the
synthetic sweeps' run folders,
scores each with the Context-Completion analogue at ``k`` completions per
masked patch, measures the diversity of the model's samples against that of
draws from the true conditional of the same images, and writes the tidy table
``results/synthetic_completion.csv``. With ``--checkpoints`` it also keeps
weights-only copies of seed 0 for the samples figure
(``results/checkpoints/synthetic_hidden_{ls,cimle_token}.pt``).

    python experiments/synthetic_completion.py [--k 8] [--checkpoints]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.train.checkpoint import save_weights_only  # noqa: E402
from study.config import load_config  # noqa: E402
from study.data.datasets import build_eval_datasets  # noqa: E402
from study.evaluation import samples as sampling  # noqa: E402
from study.evaluation.context_completion import (completion_protocol, synthetic_generator,  # noqa: E402
                                                 true_completions)
from study.evaluation.setup import load_models  # noqa: E402
from study.evaluation.results import write_results  # noqa: E402

import pandas as pd  # noqa: E402


def is_default_point(cfg, default) -> bool:
    """Same data, mask, model and training as the default config; objective ls or cimle-token."""
    same = all(getattr(cfg, f) == getattr(default, f) for f in ("data", "mask", "model", "optim", "epochs"))
    return same and (cfg.objective == "ls" or (cfg.objective == "cimle" and cfg.cimle.select == "token"))


def runs(roots: list[Path], default) -> list[Path]:
    """Checkpoints of the default point under ``roots``, one per (objective, seed)."""
    found, seen = [], set()
    for root in roots:
        for ckpt in sorted(root.glob("*/run/checkpoint.pt")):
            cfg = load_models(ckpt, which=())[0]
            key = (cfg.objective, cfg.seed)
            if is_default_point(cfg, default) and key not in seen:
                seen.add(key)
                found.append(ckpt)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["runs/synthetic_cpu"])
    p.add_argument("--config", default="experiments/configs/synthetic.yaml")
    p.add_argument("--out", default="results/synthetic_completion.csv")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--checkpoints", action="store_true", help="keep weights-only copies of seed 0")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    default = load_config(args.config, ["data.synthetic.mean_shift=0"])
    for ckpt in runs([Path(r) for r in args.runs], default):
        cfg, state, models = load_models(ckpt)
        dataset = build_eval_datasets(cfg)[1]
        gen = synthetic_generator(cfg, dataset)
        variant = "ls" if cfg.objective == "ls" else f"cimle_{cfg.cimle.select}"
        base = {"objective": cfg.objective, "cimle_select": cfg.cimle.select, "seed": cfg.seed,
                "synthetic_mean_shift": cfg.data.synthetic.mean_shift, "synthetic_distractor":
                cfg.data.synthetic.distractor, "mask_ratio": cfg.mask.ratio, "epochs": cfg.epochs, "k": args.k}
        for r in completion_protocol(cfg, models, k=args.k):
            rows.append({**base, "encoder": r["encoder"], "metric": r["metric"], "value": r["value"]})
        batch = sampling.fixed_batch(cfg, sampling.DIVERSITY_IMAGES, sampling.SEED, dataset)
        model = models["pretrained"]
        div = sampling.sample_diversity(sampling.model_samples(model, batch, args.k, sampling.SEED), batch.mask)
        true = sampling.sample_diversity(true_completions(gen, dataset, batch, args.k), batch.mask)
        rows.append({**base, "encoder": "pretrained", "metric": "sample_diversity", "value": div})
        rows.append({**base, "encoder": "pretrained", "metric": "true_diversity", "value": true})
        print(f"{ckpt}: diversity {div:.3f} (true {true:.3f})")
        if args.checkpoints and cfg.seed == 0:
            save_weights_only(Path("results/checkpoints") / f"synthetic_hidden_{variant}.pt", state)
    write_results(args.out, pd.DataFrame(rows))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
