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
# # Representation quality against mask strength: LS vs cIMLE (vs Masked VAE)
#
# Reads the tidy results table of the mask-strength sweep and draws linear-probe
# and k-NN accuracy against the mask ratio, one panel per dataset and mask kind,
# mean and 95% interval over seeds, with the random-init encoder as a baseline.
# The bands of different objectives overlap; the comparison that can tell them
# apart is the paired one: objective - LS with the same seed (same initial
# weights, data order and masks), mean and 95% t-interval over seeds.

# %% tags=["parameters"]
results = "results/mask_strength_cpu.csv"
sweep = "mask_strength_cpu"
figures = "runs/figures"  # make experiments passes figures (the sweep file's report_parameters)

# %%
from IPython.display import Image

from study.figures.studies import (mask_strength_figure, mask_strength_table, paired_difference_figure,
                                   paired_difference_table)
from study.evaluation.results import read_results

table = read_results(results)
paths = mask_strength_figure(table, figures, name=sweep)
print("\n".join(str(p) for p in paths))
Image(filename=str(paths[0]))  # the PNG just written (no dates in it: a rerun embeds the same bytes)

# %%
summary = mask_strength_table(table)
print(summary.to_string())
summary

# %% [markdown]
# ## Paired differences to least squares (same seed), in accuracy points
#
# `*` marks an interval that excludes 0; everything else is "no difference detected".

# %%
paths = paired_difference_figure(table, figures, name=f"{sweep}_paired")
print("\n".join(str(p) for p in paths) or "no objective shares a seed and a setting with LS: nothing to pair")
Image(filename=str(paths[0])) if paths else None

# %%
paired = paired_difference_table(table)
print(paired.to_string())
paired
