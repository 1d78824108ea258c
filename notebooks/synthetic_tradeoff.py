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
# # The synthetic images' trade-off: cue-to-distractor ratio
#
# Random-init, least-squares and per-token cIMLE linear probes against the ratio
# of the class cue to the image-shared distractor: where a random encoder reads
# the class, and where cIMLE stops finding it.

# %% tags=["parameters"]
results = "results/synthetic_tradeoff_cpu.csv"
sweep = "synthetic_tradeoff_cpu"
figures = "figures"

# %%
from study.figures.synthetic import synthetic_table, tradeoff_figure
from study.results import read_results

table = read_results(results)
paths = tradeoff_figure(table, figures, name="synthetic_tradeoff")
print("\n".join(str(p) for p in paths))

# %%
summary = synthetic_table(table, ["synthetic_cue", "synthetic_distractor"])
print(summary.to_string())
summary
