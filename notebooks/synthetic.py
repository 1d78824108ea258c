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
# # Same-mean synthetic images: LS vs cIMLE (image / token) vs Masked VAE
#
# Reads the tidy table of a synthetic sweep (mean shift, or mask ratio at mean
# shift 0) and draws the linear probe against its axis, both poolings, with the
# random-init encoder and chance marked. The table below holds every metric:
# probes, the masked-patch losses beside the analytic `bayes_floor` and
# `mode_floor`, and the Context-Completion scores.

# %% tags=["parameters"]
results = "results/synthetic_cpu.csv"
sweep = "synthetic_cpu"
figures = "figures"

# %%
from study.figures.synthetic import synthetic_figure, synthetic_table
from study.results import read_results

table = read_results(results)
axis = "mask_ratio" if table["mask_ratio"].nunique() > 1 else "synthetic_mean_shift"
paths = synthetic_figure(table, figures, name=sweep, axis=axis)
print("\n".join(str(p) for p in paths))

# %%
summary = synthetic_table(table, [axis])
print(summary.to_string())
summary
