"""k-NN at several k from one pass, the k = 20 rows readers take, the default pool, the linear probe's
step budget, and the probe on new crops every epoch."""

import argparse
import dataclasses

import pandas as pd
import pytest
import torch

from test_evaluation import StandInEncoder, TinyImages, _tiny_checkpoint, blobs
from study.cli.evaluate import add_arguments
from study.evaluation.features import FeatureCache, crop_features, crop_views, default_pool
from study.evaluation.knn import DEFAULT_KS, knn_accuracy, knn_predict
from study.evaluation.linear_probe import (MAE_PROBE_STEPS, linear_probe_settings, probe_batch, probe_plan,
                                           train_linear_probe)
from study.evaluation.results import HEADLINE_KNN_K, append_rows, knn_at, read_results
from study.evaluation.run import EvaluateSettings, EvaluationError, evaluate

# --------------------------------------------------------------------------- k-NN at several k


@pytest.mark.parametrize("chunk", [3, 1024])
def test_several_k_in_one_pass_equal_one_call_per_k(chunk):
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(150, 8, generator=g), torch.randn(37, 8, generator=g)
    train_y, test_y = torch.randint(0, 5, (150,), generator=g), torch.randint(0, 5, (37,), generator=g)
    ks = (1, 7, 20, 100, 200)  # 200 > 150 training points: as a single call, every point votes
    together = knn_predict(train_x, train_y, test_x, ks=ks, num_classes=5, chunk=chunk)
    assert list(together) == list(ks)
    for k in ks:
        assert torch.equal(together[k], knn_predict(train_x, train_y, test_x, k=k, num_classes=5, chunk=chunk))
    accs = knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, num_classes=5)
    assert accs == {k: knn_accuracy(train_x, train_y, test_x, test_y, k=k, num_classes=5) for k in ks}
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train_x, train_y, test_x, ks=(5, 0))


def test_settings_take_ks_or_the_single_k_of_older_callers():
    assert EvaluateSettings().knn_ks is None  # DEFAULT_KS, up to the training-set size
    assert EvaluateSettings(knn_ks=[200, 10, 20, 10]).knn_ks == (10, 20, 200)
    assert EvaluateSettings(knn_k=3).knn_ks == (3,)
    assert EvaluateSettings(knn_k=3, knn_ks=(3,)).knn_ks == (3,)
    for bad in ({"knn_k": 0}, {"knn_ks": ()}, {"knn_ks": (10, True)}, {"knn_ks": (2.5,)}, {"knn_k": 3, "knn_ks": (5,)}):
        with pytest.raises(EvaluationError):
            EvaluateSettings(**bad)


def test_evaluate_writes_a_row_per_k_and_refuses_a_k_above_the_training_set(tmp_path):
    _, _, ckpt = _tiny_checkpoint(tmp_path)
    rows = evaluate(ckpt, "knn", None, knn_ks=(1, 5, 20), random_baseline=False, progress=False, verbose=False)
    top1 = {r["knn_k"]: r["value"] for r in rows if r["metric"] == "knn_top1"}
    assert list(top1) == [1, 5, 20]
    assert [r["knn_k"] for r in rows if r["metric"] == "knn_seconds"] == [None]
    single = evaluate(ckpt, "knn", None, knn_k=5, random_baseline=False, progress=False, verbose=False)
    assert [r["value"] for r in single if r["metric"] == "knn_top1"] == [top1[5]]
    with pytest.raises(EvaluationError, match="--knn-k 100 is more neighbours than the 48 training images"):
        evaluate(ckpt, "knn", None, knn_ks=(20, 100), progress=False, verbose=False)


def test_readers_take_the_k_20_rows_and_old_rows_count_as_k_20(tmp_path):
    assert HEADLINE_KNN_K in DEFAULT_KS  # every evaluation with the default ks has the rows readers take
    old = tmp_path / "old.csv"  # written before the rows named their k
    old.write_text("metric,value,seed\nknn_top1,0.5,0\nlinear_top1,0.6,0\n")
    table = read_results(old)
    assert list(table.knn_k.fillna(-1)) == [HEADLINE_KNN_K, -1] and list(table.value) == [0.5, 0.6]
    new = tmp_path / "new.csv"
    append_rows(new, [{"metric": "knn_top1", "value": 0.1 * k / 10, "knn_k": k, "seed": 0} for k in DEFAULT_KS]
                + [{"metric": "knn_seconds", "value": 3.0, "knn_k": None, "seed": 0},
                   {"metric": "linear_top1", "value": 0.7, "seed": 0}])
    table = read_results(new)
    assert list(table.metric) == ["knn_top1", "knn_seconds", "linear_top1"] and table.value[0] == pytest.approx(0.2)
    assert len(read_results(new, knn_k=None)) == 6 and list(read_results(new, knn_k=100).value)[0] == pytest.approx(1.0)
    assert knn_at(pd.DataFrame({"metric": ["linear_top1"], "value": [0.5]})).columns.tolist() == ["metric", "value"]


# --------------------------------------------------------------------------- pool


def test_pool_defaults_to_cls_on_imagenet100_only_and_every_row_names_it(tmp_path):
    from study.evaluation.run import _Evaluation

    assert (default_pool("imagenet100"), default_pool("mnist"), default_pool("synthetic")) == ("cls", "mean", "mean")
    cfg, _, ckpt = _tiny_checkpoint(tmp_path)
    in100 = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name="imagenet100", root=str(tmp_path)))
    assert _Evaluation(ckpt, in100, {}, "study", EvaluateSettings(), FeatureCache()).s.pool == "cls"
    assert _Evaluation(ckpt, in100, {}, "study", EvaluateSettings(pool="mean"), FeatureCache()).s.pool == "mean"
    rows = evaluate(ckpt, "knn,linear,samples", None, random_baseline=False, progress=False, verbose=False)
    assert {r["protocol"]: r["pool"] for r in rows} == {"knn": "mean", "linear": "mean", "samples": None}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "x", "--knn-k", "20,10"])
    assert args.pool is None and args.knn_ks == (20, 10) and parser.parse_args(["--checkpoint", "x"]).knn_ks is None


# --------------------------------------------------------------------------- linear-probe step budget


def test_gpu_probe_batch_reaches_maes_steps_on_imagenet100():
    gpu = linear_probe_settings("gpu")
    assert gpu.min_steps == MAE_PROBE_STEPS == 7000 and gpu.batch_size == 16384 and not gpu.augment
    n = 126_689  # ImageNet-100's training images
    batch = probe_batch(n, gpu)
    assert batch == 1024  # the largest power of two <= n * 90 / 7000 = 1628.9
    assert gpu.epochs * (n // batch) >= 7000 > gpu.epochs * (n // (2 * batch))  # twice the batch falls short
    assert probe_batch(1_281_167, gpu) == 16384  # ImageNet-1k: MAE's own batch, 78 steps an epoch
    assert "lr 0.4" in probe_plan(n, gpu) and "11070 steps" in probe_plan(n, gpu)
    assert probe_batch(100, gpu) == 8 and probe_batch(5000, gpu) == 64  # a small set: a small batch, not < 8
    assert "fewer than MAE's 7000" in probe_plan(500, gpu) and "fewer" not in probe_plan(5000, gpu)
    cpu = linear_probe_settings("cpu")
    assert cpu.min_steps is None and probe_batch(126_689, cpu) == cpu.batch_size and probe_batch(100, cpu) == 100


def test_probe_reports_its_batch_and_steps():
    xtr, ytr = blobs(100)
    xva, yva = blobs(50, noise_seed=1)
    s = linear_probe_settings("gpu", epochs=3, warmup_epochs=1)
    res = train_linear_probe(xtr, ytr, xva, yva, s, progress=False)
    assert (res.batch, res.steps) == (8, 150)  # 400 features at the floor of 8: 50 steps an epoch


# --------------------------------------------------------------------------- new crops every epoch


def test_crop_views_are_random_crops_seeded_by_epoch():
    data = TinyImages(12, seed=0)
    views = crop_views(data, 8)
    assert len(views) == 12 and views[0][0].shape == (1, 8, 8) and views[0][1] == 0
    encoder = StandInEncoder()
    kw = dict(pool="mean", batch_size=5, progress=False)
    a, ya = crop_features(encoder, views, seed=0, epoch=0, **kw)
    b, _ = crop_features(encoder, views, seed=0, epoch=0, **kw)
    c, _ = crop_features(encoder, views, seed=0, epoch=1, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(ya, data.y)


def test_crop_views_of_an_image_folder_crop_the_decoded_image(tmp_path):
    from conftest import make_image_folder
    from study.data.image_folders import RobustImageFolder, eval_transform

    folder = RobustImageFolder(make_image_folder(tmp_path / "imgs", classes=2, per_class=2), eval_transform(16))
    img, label = crop_views(folder, 16)[3]
    assert img.shape == (3, 16, 16) and label == 1 and folder[3][0].shape == (3, 16, 16)


def test_augmented_probe_runs_an_epoch_in_evaluate(tmp_path):
    _, _, ckpt = _tiny_checkpoint(tmp_path)
    probe = linear_probe_settings("cpu", epochs=1, warmup_epochs=0, augment=True)
    rows = evaluate(ckpt, "linear", None, linear=probe, random_baseline=False, progress=False, verbose=False)
    top1 = next(r for r in rows if r["metric"] == "linear_top1")
    assert top1["probe_augment"] is True and top1["linear_steps"] == 1 and 0 <= top1["value"] <= 1
