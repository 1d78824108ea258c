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
# # Pretraining efficiency under strong masking: LS vs cIMLE
#
# Linear-probe and k-NN accuracy of snapshots taken during pretraining, against
# epochs and against cumulative training wall-clock seconds (cIMLE's step costs
# more: the second axis charges it for that).

# %% tags=["parameters"]
results = "results/efficiency_cpu.csv"
sweep = "efficiency_cpu"
figures = "runs/figures"  # make experiments passes figures (the sweep file's report_parameters)

# %%
from IPython.display import Image

from study.figures.studies import efficiency_figure, efficiency_table
from study.evaluation.results import read_results

table = read_results(results)
paths = efficiency_figure(table, figures, name=sweep)
print("\n".join(str(p) for p in paths))
Image(filename=str(paths[0]))  # the PNG just written (no dates in it: a rerun embeds the same bytes)

# %%
summary = efficiency_table(table)
print(summary.to_string())
summary
