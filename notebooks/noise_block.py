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
# # Where the noise enters the decoder: cIMLE with noise at the input vs at the last block
#
# With noise at the last decoder block, the blocks before it run once and only the
# last one runs k times, so a step is cheaper. Linear-probe and k-NN accuracy per
# seed, mean and 95% interval, for each place the noise enters; the dashed line is
# the random-init encoder.

# %% tags=["parameters"]
results = "results/noise_block_cpu.csv"
sweep = "noise_block_cpu"
figures = "figures"

# %%
from IPython.display import Image

from study.figures.studies import noise_block_figure, noise_block_table
from study.evaluation.results import read_results

table = read_results(results)
paths = noise_block_figure(table, figures, name=sweep)
print("\n".join(str(p) for p in paths))
Image(filename=str(paths[0]))  # the PNG just written (no dates in it: a rerun embeds the same bytes)

# %%
summary = noise_block_table(table)
print(summary.to_string())
summary
