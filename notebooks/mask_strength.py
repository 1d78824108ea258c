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

# %% tags=["parameters"]
results = "results/mask_strength_cpu.csv"
sweep = "mask_strength_cpu"
figures = "runs/figures"  # make experiments passes figures (the sweep file's report_parameters)

# %%
from study.figures.studies import mask_strength_figure, mask_strength_table
from study.results import read_results

table = read_results(results)
paths = mask_strength_figure(table, figures, name=sweep)
print("\n".join(str(p) for p in paths))

# %%
summary = mask_strength_table(table)
print(summary.to_string())
summary
