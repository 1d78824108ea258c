"""The mean-erased digits study: its sweep file, its rows' sign-flip columns and its paired table."""

import itertools

import pandas as pd

from study.studies.sweep import expand, load_sweep


def test_every_arm_runs_on_the_head_at_every_sign_flip_setting():
    points = expand(load_sweep("experiments/sweeps/mean_erased_cpu.yaml"))
    assert len(points) == 4 * 5 * 3  # 4 arms x (p = 0, and 0.25 / 0.5 per patch and per image) x 3 seeds
    assert {p.settings["noise"]["block"] for p in points} == {"head"}
    settings = {(p.settings["data"]["sign_flip"]["p"], p.settings["data"]["sign_flip"]["scope"]) for p in points}
    assert settings == {(0.0, "patch"), (0.25, "patch"), (0.25, "image"), (0.5, "patch"), (0.5, "image")}


def test_a_results_row_records_its_sign_flips():
    from study.config import load_config
    from study.evaluation.run import run_params

    row = run_params(load_config(None, ["data.sign_flip.p=0.5", "data.sign_flip.scope=image"]), {}, "study", "x")
    assert row["sign_flip_p"] == 0.5 and row["sign_flip_scope"] == "image"
    assert run_params(load_config(None, []), {}, "study", "x")["sign_flip_scope"] is None


def test_each_arm_is_paired_with_least_squares_of_its_setting_and_seed(tmp_path):
    from study.figures.mean_erased import mean_erased_rows, write_mean_erased

    rows = []
    for seed, (p, scope), encoder, metric in itertools.product(range(3), [(0.0, None), (0.5, "patch")],
                                                                ["pretrained", "random"], ["knn_top1", "linear_top1"]):
        for objective, select, gain in [("ls", "image", 0.0), ("cimle", "token", 0.2 * p), ("mvae", "image", 0.01)]:
            value = 0.5 + 0.01 * seed + (gain if encoder == "pretrained" else -0.1)
            rows.append(dict(objective=objective, cimle_select=select, noise_block="head", sign_flip_p=p,
                             sign_flip_scope=scope, seed=seed, encoder=encoder, pool="mean", metric=metric,
                             value=value))
    pd.DataFrame(rows).to_csv(tmp_path / "mean_erased_cpu.csv", index=False)
    table = mean_erased_rows(pd.read_csv(tmp_path / "mean_erased_cpu.csv")).set_index(["setting", "metric", "arm"])
    token = table.loc[("p = 0.5, patch", "knn_top1", "per-token cIMLE")]
    assert abs(token["diff"] - 10.0) < 1e-6 and token.n == 3  # +0.2 x 0.5, in points, every seed
    assert abs(table.loc[("p = 0", "knn_top1", "per-token cIMLE")]["diff"]) < 1e-6
    paths = write_mean_erased(tmp_path, tmp_path)
    assert all(p.is_file() for p in paths) and "| p = 0.5, patch | k-NN % | per-token cIMLE |" in paths[-1].read_text()
