"""The k-axis study: the latent-swap diagnostic on real models and the paired analysis of its tables."""

import itertools

import pandas as pd
import pytest
import torch

from conftest import tiny_overrides
from study.config import load_config
from study.data.datasets import build_eval_datasets
from study.evaluation.latent_swap import latent_swap
from study.methods.model import build_model


class _Repeated:
    """One image, ``n`` times: every other image's latent is the image's own."""

    def __init__(self, dataset, n):
        self.item, self.n = dataset[0], n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item


@pytest.mark.parametrize("objective", ["ls", "cimle"])
def test_swap_gain_is_zero_when_every_image_is_the_same_and_not_otherwise(objective):
    cfg = load_config(None, tiny_overrides(f"objective={objective}", per_class=20))
    torch.manual_seed(0)
    model = build_model(cfg)
    val = build_eval_datasets(cfg)[1]
    same = latent_swap(model, cfg, _Repeated(val, 9), batch_size=4, repeats=2)
    assert same["swap_gain"] == 0.0 and same["swap_own_loss"] == same["swap_other_loss"] > 0
    other = latent_swap(model, cfg, val, batch_size=8, repeats=2)
    assert other["swap_gain"] != 0.0
    assert latent_swap(model, cfg, val, batch_size=8, repeats=2) == other  # seeded masks and noise
    assert model.training  # left as found


def _tables(tmp_path):
    """Sweep-shaped tables: cIMLE k in {1, 8} for both variants, LS on both decoders, 3 seeds."""
    rows, swap = [], []
    for seed, encoder, pool in itertools.product(range(3), ["pretrained", "random"], ["mean", "cls"]):
        runs = [("ls", "image", "0", 8), ("ls", "image", "head", 8)]
        runs += [("cimle", sel, "head" if sel == "token" else "0", k) for sel in ("token", "image") for k in (1, 8)]
        for objective, select, block, k in runs:
            value = 0.5 + 0.01 * seed + (0.02 * k if objective == "cimle" and select == "token" else 0)
            value += 0.1 if block == "head" and objective == "ls" else 0  # LS-head is its own baseline
            for metric in ("knn_top1", "linear_top1"):
                rows.append(dict(objective=objective, cimle_select=select, noise_block=block, k=k, seed=seed,
                                 encoder=encoder, pool=pool, metric=metric, value=value, dataset="mnist"))
            if encoder == "pretrained" and pool == "mean":
                swap.append(dict(objective=objective, cimle_select=select, noise_block=block, k=k, seed=seed,
                                 dataset="mnist", metric="swap_gain", value=0.1 + 0.01 * k * (objective == "cimle")
                                 + 0.001 * seed))
    table = pd.DataFrame(rows)
    table.to_csv(tmp_path / "k_axis_cpu.csv", index=False)
    table.assign(dataset="synthetic").to_csv(tmp_path / "k_axis_synthetic_cpu.csv", index=False)
    pd.DataFrame(swap).to_csv(tmp_path / "k_axis_latent_swap.csv", index=False)


def test_k_axis_pairs_each_variant_with_ls_on_its_own_decoder(tmp_path):
    from study.figures.k_axis import k_axis_rows, swap_rows, write_k_axis

    _tables(tmp_path)
    probe = k_axis_rows(tmp_path).set_index(["data", "variant", "k"])
    token8 = probe.loc[("MNIST-5k, ratio 0.9", "per token", 8)]
    # token: 0.5 + 0.01 s + 0.16 against LS-head 0.6 + 0.01 s: +0.06, no seed noise -> zero-width interval
    assert token8.seeds == 3 and token8["diff"] == pytest.approx(6.0) and token8.low == pytest.approx(6.0)
    image1 = probe.loc[("synthetic images", "per image", 1)]
    assert image1["diff"] == pytest.approx(0.0, abs=1e-12)  # against the plain decoder's LS, not the head's
    swap = swap_rows(tmp_path).set_index(["data", "variant", "k"])
    assert swap.loc[("MNIST-5k, ratio 0.9", "per token", 8), "diff"] == pytest.approx(8.0)
    first, second = write_k_axis(tmp_path, tmp_path / "a"), write_k_axis(tmp_path, tmp_path / "b")
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert "| MNIST-5k, ratio 0.9 (3) | per token | 8 |" in (tmp_path / "a" / "k_axis.md").read_text()


def test_the_diagnostic_script_replaces_the_rows_of_the_runs_it_reads_and_keeps_the_others(tmp_path):
    """A rerun of one sweep's diagnostic must not drop the other sweep's committed rows."""
    from experiments.latent_swap import main as latent_swap_main
    from study.train.loop import pretrain

    for sweep, objective in (("sweep_a", "ls"), ("sweep_b", "cimle")):
        cfg = load_config(None, tiny_overrides(f"objective={objective}", "epochs=1", per_class=10))
        pretrain(cfg, tmp_path / "runs" / sweep / f"{objective}_s0" / "run", progress=False)
    out = tmp_path / "swap.csv"
    runs = [str(tmp_path / "runs" / s) for s in ("sweep_a", "sweep_b")]
    assert latent_swap_main(["--runs", *runs, "--out", str(out)]) == 0
    both = pd.read_csv(out)
    assert sorted(both.point.unique()) == ["cimle_s0", "ls_s0"] and len(both) == 2 * both.metric.nunique()
    assert latent_swap_main(["--runs", runs[1], "--out", str(out)]) == 0
    again = pd.read_csv(out)
    assert len(again) == len(both)  # the LS run's rows kept, the cIMLE run's replaced, not added
    key = ["point", "metric"]
    pd.testing.assert_frame_equal(again.sort_values(key).reset_index(drop=True),
                                  both.sort_values(key).reset_index(drop=True))
