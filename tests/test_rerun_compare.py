"""experiments/rerun_compare.py: the per-seed objective - LS differences before and after a rerun."""

import itertools

import pandas as pd
import pytest

from experiments.rerun_compare import compare, summary


def _k_axis_table(token_shift: float = 0.0) -> pd.DataFrame:
    """cIMLE per token (head) and per image at k in {1, 8}, LS on both decoders, 3 seeds, seed-dependent values."""
    runs = [("ls", "image", "0", 8), ("ls", "image", "head", 8)]
    runs += [("cimle", sel, "head" if sel == "token" else "0", k) for sel in ("token", "image") for k in (1, 8)]
    rows = []
    for seed, (objective, select, block, k) in itertools.product(range(3), runs):
        value = 0.5 + 0.01 * seed + (0.1 if block == "head" else 0) + (0.001 * k if objective == "cimle" else 0)
        value += token_shift * seed if (objective, select, k) == ("cimle", "token", 8) else 0
        rows.append(dict(objective=objective, cimle_select=select, noise_block=block, k=k, seed=seed,
                         encoder="pretrained", pool="mean", metric="knn_top1", value=value, dataset="mnist"))
    return pd.DataFrame(rows)


def test_each_k_pairs_with_ls_on_its_own_decoder_and_only_a_moved_comparison_is_flagged():
    before, after = _k_axis_table(), _k_axis_table(token_shift=0.01)
    frame = compare(before, after).set_index("objective")
    assert sorted(frame.index) == ["cimle k=1", "cimle k=8", "cimle-token k=1", "cimle-token k=8"]
    assert frame.loc["cimle-token k=1", "versus"] == "ls-head" and frame.loc["cimle k=1", "versus"] == "ls"
    # per token, k = 1, against LS with the head: 0.001 in every seed, not the head's +0.1 over plain LS
    assert frame.loc["cimle-token k=1", "before"] == pytest.approx(0.1)
    unchanged = frame.drop(index="cimle-token k=8")
    assert not unchanged.moved.any() and (unchanged.change == 0).all() and not unchanged.rerun.any()
    moved = frame.loc["cimle-token k=8"]
    # after - before = 0, 1, 2 points in seeds 0, 1, 2: mean +1 with a spread as wide, so within seed noise
    assert moved.change == pytest.approx(1.0) and moved.n == 3
    assert moved.change_low < 0 < moved.change_high and not moved.moved and moved.rerun


def test_a_shift_shared_by_every_seed_is_flagged():
    before = _k_axis_table()
    after = before.copy()
    after.loc[(after.objective == "cimle") & (after.cimle_select == "image") & (after.k == 1), "value"] += 0.02
    frame = compare(before, after).set_index("objective")
    assert frame.loc["cimle k=1", "moved"] and frame.loc["cimle k=1", "change"] == pytest.approx(2.0)
    assert frame.moved.sum() == 1


def test_where_the_study_has_one_ls_each_variant_pairs_with_it():
    """The synthetic k axis: both cIMLE variants put their noise in the head, and LS runs on the head only."""
    table = _k_axis_table()
    table = table[(table.objective != "ls") | (table.noise_block == "head")].assign(noise_block="head")
    frame = compare(table, table).set_index("objective")
    assert set(frame.versus) == {"ls-head"}
    # per image, k = 8 (its values built without the head's +0.1), against LS with the head: 0.008 - 0.1
    assert frame.loc["cimle k=8", "before"] == pytest.approx(-9.2) and not frame.moved.any()


def test_the_summary_counts_each_study_and_names_the_moved_changes():
    before = _k_axis_table()
    after = before.copy()
    after.loc[(after.objective == "cimle") & (after.cimle_select == "image") & (after.k == 1), "value"] += 0.02
    text = summary({"shifted": compare(before, after), "same": compare(before, before)})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines()[2:] if line}
    # only the shifted comparison was rerun: chance alone moves 5% of 1, not of 4
    assert rows["shifted"][:4] == ["4", "1", "1 (+2.0)", "0.1"] and rows["shifted"][4].startswith("2.0")
    assert rows["same"][:3] == ["4", "0", "0"] and rows["same"][4].startswith("0.0")
    assert rows["all"][:3] == ["8", "1", "1"]
