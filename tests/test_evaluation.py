"""Evaluation protocols: k-NN against a brute-force reference, linear probe and LARS on separable
data, a finetune step through timm's pieces, and the evaluate command's rows (random baseline marked)."""

import argparse
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import as_sets
from study.evaluation.features import FeatureCache, extract_features
from study.evaluation.finetune import ViTClassifier, finetune, finetune_settings
from study.evaluation.knn import knn_accuracy, knn_predict
from study.evaluation.linear_probe import LARS, linear_probe_settings, train_linear_probe
from study.utils.errors import UserError
from study.cli.evaluate import add_arguments, run_from_args
from study.evaluation.run import EvaluationError, evaluate, parse_protocols

# --------------------------------------------------------------------------- helpers


class StandInEncoder(nn.Module):
    """The ViTEncoder interface (timm names) at toy size, independent of study.models."""

    def __init__(self, img_size=8, patch_size=4, in_chans=1, dim=16, depth=2, heads=2):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        self.embed_dim = dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, dim) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, 2.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def features(self, imgs, pool="cls"):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(1)


class TinyImages(torch.utils.data.Dataset):
    """Two classes: horizontal vs vertical stripes (visible in every patch), plus noise."""

    num_classes = 2

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
        x[self.y == 0, :, ::2, :] += 1.0
        x[self.y == 1, :, :, ::2] += 1.0
        self.x = x

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def blobs(n_per_class, classes=4, dim=32, noise_seed=0):
    """Gaussian classes around fixed centres (separable); ``noise_seed`` draws fresh points."""
    centers = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) / math.sqrt(dim)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    g = torch.Generator().manual_seed(1000 + noise_seed)
    x = centers[y] + 0.5 * torch.randn(len(y), dim, generator=g) + 5.0  # offset: BatchNorm must centre
    return x, y


# --------------------------------------------------------------------------- k-NN


def knn_reference(train_x, train_y, test_x, k, temperature, num_classes):
    """Plain loops: cosine similarity to every training point, k largest, exp(sim / T) votes."""
    preds = []
    for i in range(test_x.shape[0]):
        q = test_x[i].tolist()
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for j in range(train_x.shape[0]):
            t = train_x[j].tolist()
            tn = math.sqrt(sum(v * v for v in t))
            sims.append((sum(a * b for a, b in zip(q, t)) / (qn * tn), j))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(sim / temperature)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,chunk", [(1, 4), (5, 3), (20, 1000), (50, 7)])
def test_knn_matches_brute_force(k, chunk):
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(40, 6, generator=g), torch.randn(13, 6, generator=g)
    train_y = torch.randint(0, 4, (40,), generator=g)
    ref = knn_reference(train_x, train_y, test_x, min(k, 40), 0.07, 4)
    got = knn_predict(train_x, train_y, test_x, k=k, temperature=0.07, num_classes=4, chunk=chunk)
    assert torch.equal(got, ref)
    test_y = torch.randint(0, 4, (13,), generator=g)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=k, num_classes=4) == pytest.approx(
        (ref == test_y).float().mean().item())


def test_knn_is_scale_invariant_and_checks_arguments():
    x, y = blobs(20, classes=3, dim=8)
    assert torch.equal(knn_predict(x, y, x[:10]), knn_predict(3 * x, y, 0.5 * x[:10]))
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(x, y, x, k=0)


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_cpu_preset_separable():
    xtr, ytr = blobs(100)
    xva, yva = blobs(50, noise_seed=1)  # same class centres, fresh points
    res = train_linear_probe(xtr, ytr, xva, yva, linear_probe_settings("cpu"), progress=False)
    assert res.top1 >= 0.95 and res.train_top1 >= 0.95
    assert res.losses[-1] < res.losses[0]
    assert isinstance(res.head[0], nn.BatchNorm1d) and not res.head[0].affine


def test_linear_probe_lars_gpu_recipe_scaled_down():
    xtr, ytr = blobs(100)
    xva, yva = blobs(50, noise_seed=1)
    gpu = linear_probe_settings("gpu")
    assert (gpu.optimizer, gpu.blr, gpu.batch_size, gpu.epochs, gpu.warmup_epochs, gpu.weight_decay) == (
        "lars", 0.1, 16384, 90, 10, 0.0)
    # LARS steps scale with lr = blr * batch / 256; at 400 points the published lr (6.4 at batch
    # 16384) needs blr = 6.4 * 256 / 100 at batch 100
    s = linear_probe_settings("gpu", batch_size=100, blr=6.4 * 256 / 100, epochs=30, warmup_epochs=3)
    res = train_linear_probe(xtr, ytr, xva, yva, s, progress=False)
    assert res.top1 >= 0.95 and res.losses[-1] < 0.5 * res.losses[0]


def test_lars_trust_ratio_and_1d_params():
    w = nn.Parameter(torch.full((2, 2), 2.0))  # ||w|| = 4
    b = nn.Parameter(torch.zeros(2))
    opt = LARS([w, b], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.full((2, 2), 0.5)  # ||g|| = 1 -> step = 0.001 * 4 / 1 * g
    b.grad = torch.ones(2)
    opt.step()
    assert torch.allclose(w, torch.full((2, 2), 2.0 - 0.001 * 4 * 0.5))
    assert torch.allclose(b, -torch.ones(2))  # 1-d: plain SGD


# --------------------------------------------------------------------------- finetune


def test_layer_decay_groups_follow_mae():
    from timm.optim import create_optimizer_v2

    model = ViTClassifier(StandInEncoder(depth=2), 2, pool="cls")
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    assert scale["head.weight"][0] == 1.0 and scale["encoder.norm.weight"][0] == 1.0
    assert scale["encoder.blocks.1.mlp.fc1.weight"][0] == 0.5
    assert scale["encoder.blocks.0.mlp.fc1.weight"][0] == 0.25
    assert scale["encoder.patch_embed.proj.weight"][0] == 0.125
    assert scale["encoder.cls_token"][1] == 0.0 and scale["head.bias"][1] == 0.0
    assert scale["head.weight"][1] == 0.05
    assert "encoder.pos_embed" not in scale  # frozen


@pytest.mark.parametrize("mix", [False, True])
def test_finetune_learns_tiny_separable_set(mix):
    torch.manual_seed(0)
    enc = StandInEncoder()
    s = finetune_settings("cpu", epochs=8, batch_size=16, blr=0.1, warmup_epochs=0, drop_path=0.1,
                          mixup=0.8 if mix else 0.0, cutmix=1.0 if mix else 0.0, pool="mean")
    res = finetune(enc, TinyImages(64, 0), TinyImages(32, 1), 2, s, progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    assert res.losses[-1] < res.losses[0]
    if not mix:
        assert res.top1 >= 0.9
    # drop path was set on the timm blocks, rising with depth
    assert type(enc.blocks[0].drop_path1).__name__ == "Identity"
    assert enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


# --------------------------------------------------------------------------- features / cache


def test_feature_cache_memory_and_disk(tmp_path):
    enc = StandInEncoder()
    ds = TinyImages(10, 0)
    calls = []

    def compute():
        calls.append(1)
        return extract_features(enc, ds, batch_size=4, progress=False)

    key = {"a": 1}
    cache = FeatureCache(tmp_path)
    f1, y1 = cache.get(key, compute)
    f2, _ = cache.get(key, compute)
    f3, _ = FeatureCache(tmp_path).get(key, compute)  # from disk
    assert len(calls) == 1 and f1.shape == (10, 16) and torch.equal(y1, ds.y)
    assert torch.equal(f1, f2) and torch.equal(f1, f3)
    assert enc.training  # the mode is restored after extraction


# --------------------------------------------------------------------------- evaluate


def test_protocol_names_are_checked():
    assert parse_protocols("knn, linear,knn") == ["knn", "linear"]
    with pytest.raises(EvaluationError, match="knn, linear, finetune"):
        parse_protocols("knn,probe")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        evaluate(tmp_path / "nope.pt", "knn", None, progress=False, verbose=False)


TINY = [
    "data.name=synthetic", "data.synthetic.classes=3", "data.synthetic.per_class=20", "data.augment=false",
    "model.img_size=8", "model.patch_size=4", "model.embed_dim=16", "model.depth=2", "model.num_heads=2",
    "model.decoder_dim=8", "model.decoder_depth=1", "model.decoder_heads=2", "mask.ratio=0.5", "noise.dim=4",
]


def _tiny_checkpoint(tmp_path):
    from study.config import config_to_dict, load_config
    from study.methods.model import build_model

    cfg = load_config(None, TINY)
    torch.manual_seed(123)  # not the config seed: differs from the random-init baseline
    model = build_model(cfg)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 4}, path)
    return cfg, model, path


REQUIRED_COLUMNS = {"metric", "value", "objective", "mask_kind", "mask_ratio", "k", "noise_dim", "noise_block",
                    "seed", "epochs", "dataset", "checkpoint", "protocol", "pool", "encoder"}


def test_evaluate_appends_rows_with_random_baseline(tmp_path):
    _, _, ckpt = _tiny_checkpoint(tmp_path)
    results = tmp_path / "results.csv"
    rows = evaluate(ckpt, "knn,linear,finetune", results, finetune_max_steps=2, progress=False, verbose=False)
    table = pd.read_csv(results)
    assert len(table) == len(rows)
    assert REQUIRED_COLUMNS <= set(table.columns)
    assert set(table["encoder"]) == {"pretrained", "random"}
    assert set(table["protocol"]) == {"knn", "linear", "finetune"}
    top1 = table[table.metric.str.endswith("_top1")]
    for protocol in ("knn", "linear", "finetune"):
        sub = top1[top1.protocol == protocol]
        assert set(sub.encoder) == {"pretrained", "random"}
        assert sub.value.between(0, 1).all()
    assert (table.epochs == 5).all() and (table.checkpoint == str(ckpt)).all()
    # one k-NN row per default k the 48 training images hold, and one time row, per encoder
    knn = table[table.protocol == "knn"]
    assert sorted(knn[knn.metric == "knn_top1"].knn_k) == [10, 10, 20, 20] and knn[knn.metric == "knn_seconds"].knn_k.isna().all()
    assert (table.pool == "mean").all()  # every row names its pool; synthetic data reads the mean by default
    linear = table[table.protocol == "linear"]
    assert (linear.linear_batch == 48).all() and (linear.linear_steps == 50).all()
    # a second evaluation appends
    evaluate(ckpt, "knn", results, progress=False, verbose=False)
    assert len(pd.read_csv(results)) == len(rows) + 6


def test_random_baseline_is_the_seeded_init_and_differs_from_pretrained(tmp_path):
    from study.config import load_config
    from study.evaluation.setup import build_encoders, load_for_evaluation
    from study.methods.model import build_model

    _, model, ckpt = _tiny_checkpoint(tmp_path)
    cfg, state, fmt = load_for_evaluation(ckpt)
    encs = build_encoders(cfg, state, fmt, ("pretrained", "random"))
    torch.manual_seed(load_config(None, TINY).seed)
    fresh = build_model(cfg).encoder
    for (name, a), b in zip(encs["random"].state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(encs["pretrained"].state_dict().values(), model.encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(encs["pretrained"].blocks[0].attn.qkv.weight, encs["random"].blocks[0].attn.qkv.weight)


def test_facebookresearch_format_needs_a_config(tmp_path, capsys):
    _, model, _ = _tiny_checkpoint(tmp_path)
    fb = tmp_path / "mae_pretrain.pth"
    torch.save({"model": model.encoder.state_dict()}, fb)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run_from_args(parser.parse_args(["--checkpoint", str(fb), "--quiet"])) == 2
    assert "--config" in capsys.readouterr().err
    results = tmp_path / "fb.csv"
    sets = as_sets(TINY)
    args = ["--checkpoint", str(fb), "--protocols", "knn", "--results", str(results), "--quiet"] + sets
    assert run_from_args(parser.parse_args(args)) == 0
    table = pd.read_csv(results)
    assert set(table.checkpoint_format) == {"facebookresearch"} and set(table.encoder) == {"pretrained", "random"}
    assert run_from_args(parser.parse_args(["--checkpoint", str(fb), "--protocols", "knn,svm", "--quiet"]
                                           + sets)) == 2
    assert "valid protocols: knn, linear, finetune" in capsys.readouterr().err


# --------------------------------------------------------------------------- the results table, output


@pytest.mark.parametrize("kind", ["folder", "binary", "ragged", "unrelated", "below a file"])
def test_bad_results_table_fails_before_any_protocol(tmp_path, monkeypatch, kind):
    import time

    import study.evaluation.run as run

    _, _, ckpt = _tiny_checkpoint(tmp_path)
    bad = {"folder": tmp_path / "folder.csv", "binary": tmp_path / "b.csv", "ragged": tmp_path / "r.csv",
           "unrelated": tmp_path / "u.csv", "below a file": tmp_path / "afile" / "results.csv"}[kind]
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "b.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "r.csv").write_text("metric,value\na,1\nb,2,3\n")
    (tmp_path / "u.csv").write_text("name,score\nx,1\n")
    (tmp_path / "afile").write_text("x")
    ran = []
    monkeypatch.setattr(run, "extract_features", lambda *a, **k: ran.append("features"))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="results table|CSV|cannot create"):
        evaluate(ckpt, "knn,linear", bad, progress=False, verbose=False)
    assert ran == [] and time.perf_counter() - start < 10


def test_blank_results_file_takes_the_rows(tmp_path):
    _, _, ckpt = _tiny_checkpoint(tmp_path)
    results = tmp_path / "blank.csv"
    results.write_text("\n\n")
    rows = evaluate(ckpt, "knn", results, progress=False, verbose=False)
    assert len(pd.read_csv(results)) == len(rows) == 6


def test_rows_survive_a_failed_write_in_a_side_file(tmp_path, monkeypatch):
    import study.evaluation.run as evaluation_run

    _, _, ckpt = _tiny_checkpoint(tmp_path)
    results = tmp_path / "results.csv"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation_run, "append_rows", disk_full)
    with pytest.raises(Exception, match="No space left on device") as info:
        evaluate(ckpt, "knn", results, progress=False, verbose=False)
    message = str(info.value)
    side = [p for p in tmp_path.glob("results.unsaved-*.csv")]
    assert len(side) == 1 and str(side[0]) in message
    table = pd.read_csv(side[0])
    assert len(table) == 6 and set(table.metric) == {"knn_top1", "knn_seconds"}


def test_evaluate_log_is_one_line_per_protocol_without_bars(tmp_path, capsys):
    _, _, ckpt = _tiny_checkpoint(tmp_path)
    evaluate(ckpt, "knn,linear,finetune", tmp_path / "r.csv", finetune_max_steps=2)  # progress on, output captured
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = captured.out.splitlines()
    for protocol in ("knn", "linear", "finetune", "linear-probe"):
        assert len([line for line in lines if line.strip().startswith(protocol + " ")]) == 1, captured.out
    assert "linear-probe batch 48 (lr 0.005625): 50 steps, 50 epochs of 1 on 48 images" in captured.out
    assert "knn_top1 k=10/20 " in captured.out and "(k 100, 200 left out: 48 training images)" in captured.out
    assert len(lines) == 6, captured.out  # header, the probe's steps, three protocols, where the rows went


# --------------------------------------------------------------------------- a protocol that fails


def _crash(*args, **kwargs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_crashed_protocol_keeps_the_others_rows_and_is_named(tmp_path, monkeypatch):
    import study.evaluation.run as evaluation_run

    _, _, ckpt = _tiny_checkpoint(tmp_path)
    results = tmp_path / "results.csv"
    monkeypatch.setattr(evaluation_run, "finetune", _crash)
    with pytest.raises(RuntimeError) as info:
        evaluate(ckpt, "knn,linear,finetune", results, progress=False, verbose=False)
    assert results.exists(), "the rows of the protocols that succeeded were not saved"
    table = pd.read_csv(results)
    assert set(table.protocol) == {"knn", "linear"}
    for metric in ("knn_top1", "linear_top1"):
        assert sorted(set(table[table.metric == metric].encoder)) == ["pretrained", "random"]
    error = info.value
    assert isinstance(error, evaluation_run.ProtocolFailed)
    assert not isinstance(error, UserError)  # a crash keeps its traceback in the command
    assert isinstance(error.__cause__, RuntimeError) and "illegal memory access" in str(error.__cause__)
    message = str(error)
    assert message.startswith("protocol finetune failed: RuntimeError: CUDA error"), message
    assert f"the {len(table)} rows of knn, linear are in {results}" in message
    assert len(error.rows) == len(table)


def test_a_protocol_that_fails_on_the_random_encoder_adds_no_rows(tmp_path, monkeypatch):
    import study.evaluation.run as evaluation_run

    _, _, ckpt = _tiny_checkpoint(tmp_path)
    calls = []

    def fails_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _crash()
        return train_linear_probe(*args, **kwargs)

    monkeypatch.setattr(evaluation_run, "train_linear_probe", fails_second_time)
    with pytest.raises(RuntimeError, match="protocol linear failed") as info:
        evaluate(ckpt, "knn,linear", None, progress=False, verbose=False)
    rows = info.value.rows
    assert {r["protocol"] for r in rows} == {"knn"} and {r["encoder"] for r in rows} == {"pretrained", "random"}
    assert "are on this error's .rows" in str(info.value)


def test_a_failed_protocol_is_one_error_line_when_it_is_the_users_to_fix(tmp_path, monkeypatch, capsys):
    import study.evaluation.run as evaluation_run
    from study.data.image_folders import BadImageError

    def bad_image(*args, **kwargs):
        raise BadImageError("cannot decode /data/train/n01/x.JPEG: truncated file")

    _, _, ckpt = _tiny_checkpoint(tmp_path)
    results = tmp_path / "results.csv"
    monkeypatch.setattr(evaluation_run, "finetune", bad_image)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    status = run_from_args(parser.parse_args(["--checkpoint", str(ckpt), "--protocols", "knn,finetune",
                                              "--results", str(results), "--quiet"]))
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("error: protocol finetune failed: cannot decode"), err
    assert set(pd.read_csv(results).metric) == {"knn_top1", "knn_seconds"}
