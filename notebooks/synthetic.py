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
# Reads the tidy table of the synthetic sweep, which moves one axis at a time
# away from the default point (mean shift 0, mask ratio 0.75, distractor 0.75),
# and draws the linear probe against each axis, both poolings, with the
# random-init encoder and chance marked. The tables hold every metric: probes,
# the masked-patch losses beside the analytic `bayes_floor` and `mode_floor`,
# and the Context-Completion scores.

# %% tags=["parameters"]
results = "results/synthetic_cpu.csv"
sweep = "synthetic_cpu"
figures = "figures"

# %%
from study.figures.synthetic import (DEFAULT_POINT, axis_slice, probe_rows, synthetic_figure, synthetic_table,
                                     tradeoff_figure, variant_labels)
from study.evaluation.results import read_results

table = read_results(results)
paths = synthetic_figure(table, figures, name=sweep, axis="synthetic_mean_shift")
paths += synthetic_figure(table, figures, name="synthetic_ratio_cpu", axis="mask_ratio")
paths += tradeoff_figure(table, figures, name="synthetic_tradeoff")
print("\n".join(str(p) for p in paths))

# %% [markdown]
# ## Class mean shift (mask ratio 0.75, distractor 0.75)

# %%
summary = synthetic_table(axis_slice(table, "synthetic_mean_shift"), ["synthetic_mean_shift"])
print(summary.to_string())

# %% [markdown]
# ## Mask ratio (mean shift 0, distractor 0.75)

# %%
print(synthetic_table(axis_slice(table, "mask_ratio"), ["mask_ratio"]).to_string())

# %% [markdown]
# ## Cue-to-distractor trade-off (mean shift 0, mask ratio 0.75)

# %%
print(synthetic_table(axis_slice(table, "synthetic_distractor"), ["synthetic_distractor"]).to_string())

# %% [markdown]
# ## The claim, checked at the default point
#
# Every number is a mean over the seeds of the committed table (and, for
# diversity, of `results/synthetic_completion.csv`, written by
# `experiments/synthetic_completion.py`). Each objective is judged on the same
# pooling; both poolings are shown.

# %%
from pathlib import Path

import pandas as pd

completion = "results/synthetic_completion.csv"


along_shift = axis_slice(table, "synthetic_mean_shift")  # ratio and distractor at their defaults
default = along_shift[along_shift.synthetic_mean_shift == 0.0]
probe = probe_rows(default, "synthetic_mean_shift")
checks = []
for pool in ("cls", "mean"):
    at = probe[probe["pool"] == pool]
    ls, rnd, tok = (at[at.variant == v].set_index("seed").value
                    for v in ("least squares", "random init", "cIMLE (token)"))
    gap = (tok - ls).dropna()
    checks += [
        (f"{pool}: LS probe {ls.mean():.3f} <= random init {rnd.mean():.3f} + 0.05", ls.mean() <= rnd.mean() + 0.05),
        (f"{pool}: cIMLE-token probe >= 0.90 in every seed (lowest {tok.min():.3f}, n={len(tok)})", tok.min() >= 0.9),
        (f"{pool}: cIMLE-token - LS >= 0.30 in every seed (smallest {gap.min():.3f}, n={len(gap)})",
         len(gap) > 0 and gap.min() >= 0.3),
    ]
loss = default[(default.encoder == "pretrained") & (default.protocol == "completion")]
loss = loss.assign(variant=variant_labels(loss))


def loss_mean(metric, variant):
    return loss[(loss.metric == metric) & (loss.variant == variant)].value.mean()


bayes, modes = loss_mean("bayes_floor", "least squares"), loss_mean("mode_floor", "least squares")
ls_loss, tok_nearest = loss_mean("masked_loss", "least squares"), loss_mean("masked_loss_nearest", "cIMLE (token)")
precision, recall = loss_mean("cc_precision", "cIMLE (token)"), loss_mean("cc_recall", "cIMLE (token)")
way = (bayes - tok_nearest) / (bayes - modes)
checks += [
    (f"LS masked loss {ls_loss:.4f} within 5% of the analytic floor {bayes:.4f}", ls_loss <= 1.05 * bayes),
    (f"cIMLE-token nearest-of-k loss {tok_nearest:.4f}: {way:.0%} of the way from the LS floor to the "
     f"mode floor {modes:.4f} (need >= 1/3)", way >= 1 / 3),
    (f"cIMLE-token Context-Completion precision {precision:.3f} >= 0.7", precision >= 0.7),
    (f"cIMLE-token Context-Completion recall {recall:.3f} >= 0.7", recall >= 0.7),
]
shift_one = probe_rows(along_shift[along_shift.synthetic_mean_shift == 1.0], "synthetic_mean_shift")
for pool in ("cls", "mean"):
    ls1 = shift_one[(shift_one["pool"] == pool) & (shift_one.variant == "least squares")].value
    checks.append((f"{pool}: mean shift 1, LS probe {ls1.mean():.3f} >= 0.85 (n={len(ls1)})", ls1.mean() >= 0.85))
if Path(completion).is_file():
    div = read_results(completion)  # checked: a hand edit is named by its line
    div = div[div.metric.isin(["sample_diversity", "true_diversity"])]
    tok_div = div[(div.objective == "cimle") & (div.metric == "sample_diversity")].value.mean()
    true_div = div[div.metric == "true_diversity"].value.mean()
    ls_div = div[(div.objective == "ls") & (div.metric == "sample_diversity")].value.mean()
    checks += [(f"cIMLE-token sample diversity {tok_div:.2f} within 30% of the true {true_div:.2f}",
                abs(tok_div - true_div) <= 0.3 * true_div),
               (f"LS sample diversity {ls_div:.3g} is 0", ls_div == 0)]
for text, ok in checks:
    print(f"[{'PASS' if ok else 'FAIL'}] {text}")

# %% [markdown]
# ## Where the default sits on the trade-off
#
# Per distractor: the random-init probe (mean over seeds) and whether
# cIMLE-token reaches 0.90 in every seed. The default should be the lowest
# random-init probe among the distractors where it does.

# %%
trade = probe_rows(axis_slice(table, "synthetic_distractor"), "synthetic_distractor")
for pool in ("cls", "mean"):
    at = trade[trade["pool"] == pool]
    rnd = at[at.variant == "random init"].groupby("synthetic_distractor").value.mean()
    tok = at[at.variant == "cIMLE (token)"].groupby("synthetic_distractor").value
    frame = pd.DataFrame({"random init": rnd, "cIMLE-token lowest seed": tok.min(), "seeds": tok.count()})
    frame["cIMLE-token >= 0.9 in every seed"] = frame["cIMLE-token lowest seed"] >= 0.9
    print(f"{pool} features\n{frame.to_string()}")
    found = frame[frame["cIMLE-token >= 0.9 in every seed"]]["random init"]
    best = found.idxmin() if len(found) else None
    ok = best == DEFAULT_POINT["synthetic_distractor"]
    print(f"[{'PASS' if ok else 'FAIL'}] {pool}: the default distractor {DEFAULT_POINT['synthetic_distractor']} is the "
          f"lowest random-init probe where cIMLE-token reaches 0.9 in every seed (that is: {best})\n")
