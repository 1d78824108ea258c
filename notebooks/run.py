# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # One run: pretrain one configuration, then evaluate it
#
# Executed by `python -m study sweep ...` once per grid point (papermill fills the
# `parameters` cell). Pretraining resumes if the run folder already holds a
# checkpoint. The rows of each evaluation (k-NN, linear probe, ... on the
# pretrained and the random-init encoder) are appended to `results` as soon as
# it ends, so a failure later in the point keeps the rows before it. A sweep
# passes the point's own rows file; the sweep merges it into its table when the
# point ends. A failure (a protocol included: the rows of the others are kept)
# still fails the notebook, and so the point.

# %% tags=["parameters"]
config = "experiments/configs/cpu-small.yaml"
# --set style overrides, e.g. ["objective=cimle", "mask.ratio=0.9", "seed=0"]
overrides = []
out = "runs/example"
results = "runs/results.csv"
protocols = "knn,linear"
pools = "cls,mean"  # frozen features: class token and mean of patch tokens (each gets its rows)
snapshots = False  # also evaluate every snapshots/epoch_*.pt (efficiency curves)
# objectives whose points also evaluate the random-init encoder; it depends only on the seed and
# the encoder's config, so a sweep over objectives needs it from one of them ("ls") only
random_baseline_objectives = "ls,cimle,mvae"
# True / False: evaluate / skip the random-init encoder at this point whatever its objective (a sweep
# with random_baseline: once_per_seed passes it); None: the objective rule above
random_baseline = None
finetune_epochs = None  # None: the finetune preset's (cpu: 10; gpu: 300 ViT-T, 100 ViT-B); fewer for a quick sweep
# one finetune per seed, a row each with its finetune_seed: e.g. [0, 1] or "0,1"; None: the preset's (one,
# seeded with the pretraining seed)
finetune_seeds = None
sweep = ""
point = ""

# %%
from pathlib import Path

import pandas as pd

from study.config import load_config
from study.evaluation.finetune import finetune_settings
from study.evaluation.monitor import monitor_hooks
from study.evaluation.run import DECODER_PROTOCOLS, ProtocolFailed, evaluate, parse_protocols
from study.evaluation.setup import eval_device, require_labels
from study.evaluation.results import append_rows
from study.train.loop import pretrain

cfg = load_config(config, overrides)
require_labels(cfg, parse_protocols(protocols))  # before training: the evaluation would refuse it after
pretrain(cfg, out, resume=True, progress=False, epoch_hooks=monitor_hooks(cfg))
metrics = pd.read_json(Path(out) / "metrics.jsonl", lines=True)
metrics[["epoch", "loss", "images_per_sec", "train_seconds"]].tail()

# %%
checkpoints = [Path(out) / "checkpoint.pt"]
if snapshots:
    checkpoints = sorted((Path(out) / "snapshots").glob("epoch_*.pt")) + checkpoints
requested = parse_protocols(protocols)
# finetuning trains on the images with its preset's own pool, and the decoder's protocols read no
# pooled features: run them with the first pool only
POOL_FREE = ("finetune", *DECODER_PROTOCOLS)
if random_baseline is None:
    random_baseline = cfg.objective in random_baseline_objectives.split(",")
finetune = None
if isinstance(finetune_seeds, str):  # papermill's -p passes text
    finetune_seeds = [int(seed) for seed in finetune_seeds.split(",")]
finetune_changes = {name: value for name, value in (("epochs", finetune_epochs), ("seeds", finetune_seeds))
                    if value is not None}
if finetune_changes:
    finetune = finetune_settings("gpu" if eval_device(None, cfg).type == "cuda" else "cpu",
                                 embed_dim=cfg.model.embed_dim, **finetune_changes)
rows = []


def save(new_rows):
    if not new_rows:
        return
    for r in new_rows:
        r.update(sweep=sweep, point=point)
    append_rows(results, new_rows)
    rows.extend(new_rows)


for j, pool in enumerate(pools.split(",")):
    wanted = [p for p in requested if j == 0 or p not in POOL_FREE]
    if not wanted:
        continue
    for i, checkpoint in enumerate(checkpoints):
        # the random-init baseline does not depend on the snapshot: evaluate it once
        last = i == len(checkpoints) - 1
        try:
            save(evaluate(checkpoint, wanted, results=None, pool=pool, progress=False, verbose=False,
                          finetune=finetune, random_baseline=last and bool(random_baseline)))
        except ProtocolFailed as exc:
            save(exc.rows)
            raise
pd.DataFrame(rows)[["encoder", "pool", "epochs", "metric", "value"]]
