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
# checkpoint; the evaluation rows (k-NN, linear probe, ... on the pretrained
# and the random-init encoder) are appended to the results table in one atomic
# write at the end, so a point that fails midway adds no rows.

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
sweep = ""
point = ""

# %%
from pathlib import Path

import pandas as pd

from study.config import load_config
from study.evaluation.run import DECODER_PROTOCOLS, evaluate, parse_protocols
from study.results import append_rows
from study.train import pretrain

cfg = load_config(config, overrides)
pretrain(cfg, out, resume=True, progress=False)
metrics = pd.read_json(Path(out) / "metrics.jsonl", lines=True)
metrics[["epoch", "loss", "images_per_sec", "train_seconds"]].tail()

# %%
checkpoints = [Path(out) / "checkpoint.pt"]
if snapshots:
    checkpoints = sorted((Path(out) / "snapshots").glob("epoch_*.pt")) + checkpoints
requested = parse_protocols(protocols)
rows = []
for j, pool in enumerate(pools.split(",")):
    # the decoder's protocols do not read pooled features: run them with the first pool only
    wanted = [p for p in requested if j == 0 or p not in DECODER_PROTOCOLS]
    if not wanted:
        continue
    for i, checkpoint in enumerate(checkpoints):
        # the random-init baseline does not depend on the snapshot: evaluate it once
        last = i == len(checkpoints) - 1
        rows += evaluate(checkpoint, wanted, results=None, pool=pool, progress=False, verbose=False,
                         random_baseline=last and cfg.objective in random_baseline_objectives.split(","))
for r in rows:
    r.update(sweep=sweep, point=point)
# a rerun of this point replaces its rows rather than adding a second copy
append_rows(results, rows, replace={"sweep": sweep, "point": point} if point else None)
pd.DataFrame(rows)[["encoder", "pool", "epochs", "metric", "value"]]
