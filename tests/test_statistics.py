"""Paired differences over seeds: the comparison the studies report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study.evaluation.statistics import paired_differences, t_interval


def _rows(values: dict[str, list[float]], metric="knn_top1", ratio=0.9, encoder="pretrained"):
    return [dict(objective=obj, seed=seed, encoder=encoder, metric=metric, value=v, dataset="mnist",
                 mask_kind="random", mask_ratio=ratio, pool="mean", epochs=40)
            for obj, vs in values.items() for seed, v in enumerate(vs)]


def test_t_interval_matches_scipy():
    x = np.array([0.01, 0.03, -0.01, 0.02, 0.04])
    mean, low, high = t_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and (low, high) == pytest.approx(ref)
    assert np.isnan(t_interval(np.array([1.0]))[1])


def test_pairing_cancels_seed_noise():
    # seeds differ by a lot, the objective adds a constant 0.02: unpaired bands overlap, pairs do not
    seed_effect = [0.60, 0.70, 0.80, 0.65, 0.75]
    table = pd.DataFrame(_rows({"ls": seed_effect, "cimle": [v + 0.02 + 0.001 * i for i, v in enumerate(seed_effect)]}))
    out = paired_differences(table)
    (row,) = out.itertuples()
    assert row.n == 5 and row.mean_diff == pytest.approx(0.022)
    assert row.excludes_zero and row.ci_low > 0


def test_no_difference_is_reported_as_such_and_unpaired_seeds_are_dropped():
    table = pd.DataFrame(_rows({"ls": [0.8, 0.7, 0.9], "mvae": [0.81, 0.69, 0.9, 0.5]})
                         + _rows({"ls": [0.1] * 3, "mvae": [0.9] * 3}, encoder="random"))
    (row,) = paired_differences(table).itertuples()
    assert row.n == 3 and row.objective == "mvae" and not row.excludes_zero


def test_missing_baseline_is_an_error():
    with pytest.raises(ValueError, match="no 'ls' rows"):
        paired_differences(pd.DataFrame(_rows({"cimle": [0.5, 0.6]})))


def test_token_selection_is_its_own_objective():
    rows = _rows({"ls": [0.5, 0.6, 0.7], "cimle": [0.5, 0.6, 0.7]})
    token = [dict(r, objective="cimle", cimle_select="token", value=r["value"] + 0.1) for r in rows if r["objective"] == "cimle"]
    table = pd.DataFrame([dict(r, cimle_select="image") for r in rows] + token)
    out = paired_differences(table).set_index("objective")
    assert out.loc["cimle", "mean_diff"] == pytest.approx(0.0)
    assert out.loc["cimle-token", "mean_diff"] == pytest.approx(0.1)


def test_holm_adjusts_a_textbook_family_and_keeps_nan():
    from study.evaluation.statistics import holm

    adjusted = holm([0.01, 0.04, 0.03, 0.005, np.nan])
    assert np.allclose(adjusted[:4], [0.03, 0.06, 0.06, 0.02]) and np.isnan(adjusted[4])
    assert np.allclose(holm([0.2, 0.9]), [0.4, 0.9]) and np.allclose(holm([0.6, 0.9]), [1.0, 1.0])  # capped at 1
    assert holm([]).shape == (0,)


def test_paired_p_value_and_equivalence_agree_with_scipy():
    from scipy import stats

    from study.evaluation.statistics import equivalence, paired_p_value

    rng = np.random.default_rng(0)
    diff = rng.normal(0.3, 1.0, size=5)
    assert np.isclose(paired_p_value(diff), stats.ttest_1samp(diff, 0).pvalue)
    result = equivalence(diff, bound=2.0)
    lower = stats.ttest_1samp(diff, -2.0, alternative="greater").pvalue
    upper = stats.ttest_1samp(diff, 2.0, alternative="less").pvalue
    assert np.isclose(result["p_tost"], max(lower, upper))
    assert result["equivalent"] == (result["p_tost"] < 0.05)  # the 90% interval inside the bound <=> TOST at 5%
    assert not equivalence(diff + 3.0, bound=2.0)["equivalent"]
    assert not equivalence(rng.normal(0, 5, size=3), bound=2.0)["equivalent"]  # too noisy to call level


def test_the_trend_per_doubling_is_the_mean_of_the_seeds_slopes():
    from study.evaluation.statistics import trend_per_doubling

    k = [1, 2, 4, 8, 32]
    rng = np.random.default_rng(1)
    by_seed = np.array([-1.5 * np.log2(k) + rng.normal(0, 0.3, 5) for _ in range(5)])
    trend = trend_per_doubling(k, by_seed)
    slopes = [np.polyfit(np.log2(k), row, 1)[0] for row in by_seed]
    assert np.isclose(trend["slope"], np.mean(slopes)) and trend["excludes_zero"] and trend["high"] < 0
    flat = trend_per_doubling(k, rng.normal(0, 0.3, (5, 5)))
    assert flat["low"] < 0 < flat["high"]
