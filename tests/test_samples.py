"""Samples (figures, diversity) and the Context-Completion analog on synthetic images."""

import pandas as pd
import pytest
import torch

from study.config import config_to_dict, load_config
from study.evaluation.context_completion import completion_metrics, train_oracle
from study.evaluation.run import EvaluationError, evaluate
from study.evaluation.samples import completed_patches, fixed_batch, model_samples, num_samples, sample_diversity
from study.evaluation.setup import build_models
from study.figures.samples import draw_samples
from study.figures.samples import main as figures_main
from study.data.synthetic_images import SyntheticImageGenerator

TINY = [
    "data.name=synthetic", "data.synthetic.classes=2", "data.synthetic.per_class=40", "data.augment=false",
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
    "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2",
    "optim.batch_size=8", "optim.warmup_epochs=1", "noise.dim=4", "cimle.k=3", "mask.ratio=0.5",
]


def tiny(objective, *extra):
    return load_config(None, TINY + [f"objective={objective}", *extra])


def tiny_model(objective, *extra):
    cfg = tiny(objective, *extra)
    return cfg, build_models(cfg, {}, "study", ("random",))["random"]


def weights_only(tmp_path, objective, seed=123):
    """A weights-only checkpoint ``{model, config, epoch, train_seconds}`` (as results/checkpoints/ holds)."""
    cfg, model = tiny_model(objective)
    torch.manual_seed(seed)  # weights unlike the seeded random-init baseline
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"tiny_{objective}.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 1, "train_seconds": 0.5}, path)
    return path


# --------------------------------------------------------------------------- samples


@pytest.mark.parametrize("objective", ["cimle", "mvae"])
def test_stochastic_samples_differ_and_keep_visible_patches(objective):
    cfg, model = tiny_model(objective)
    batch = fixed_batch(cfg, 5)
    k = num_samples(cfg)
    assert k == 3
    s = model_samples(model, batch, k)  # [k, B, N, D]
    assert s.shape == (k, 5, cfg.num_patches, cfg.model.patch_size**2)
    m = batch.mask
    target = model.patchify(batch.images)
    assert torch.equal(s[:, ~m], target[~m].expand(k, *target[~m].shape))  # visible: pasted input
    for i in range(k):
        for j in range(i + 1, k):
            assert not torch.allclose(s[i][m], s[j][m])
    assert torch.equal(s, model_samples(model, batch, k))  # fixed seed: same samples
    assert sample_diversity(s, m) > 0


def test_least_squares_gives_one_output():
    cfg, model = tiny_model("ls")
    batch = fixed_batch(cfg, 5)
    s = model_samples(model, batch, 4)
    assert s.shape[0] == 4
    assert all(torch.equal(s[0], s[i]) for i in range(1, 4))
    again = completed_patches(model, batch.images, batch.mask, 4, torch.Generator().manual_seed(99))
    assert torch.equal(s, again)  # no noise anywhere: any seed, repeated calls, same output
    recon = model.reconstruct(batch.images, batch.mask)
    assert torch.allclose(s[0][batch.mask], recon[batch.mask])
    assert sample_diversity(s, batch.mask) == 0.0


def test_fixed_batch_is_seeded():
    cfg = tiny("ls")
    a, b, c = fixed_batch(cfg, 6), fixed_batch(cfg, 6), fixed_batch(cfg, 6, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.indices, c.indices)
    assert (a.mask.sum(1) == cfg.num_patches // 2).all()


def test_sample_diversity_values():
    mask = torch.tensor([[True, False, True]])
    base = torch.randn(1, 3, 4)
    same = base.expand(3, 1, 3, 4).clone()
    assert sample_diversity(same, mask) == 0.0
    vis = same.clone()
    vis[1, 0, 1] += 10.0  # a visible patch: ignored
    assert sample_diversity(vis, mask) == 0.0
    two = same[:2].clone()
    two[1, 0, 0] += torch.tensor([3.0, 0, 0, 0])
    two[1, 0, 2] += torch.tensor([0, 4.0, 0, 0])
    assert sample_diversity(two, mask) == pytest.approx(5.0)
    # three samples: pairs at distances 5, 5, 0 -> mean 10/3
    three = torch.cat([two, two[1:]])
    assert sample_diversity(three, mask) == pytest.approx(10 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        sample_diversity(same[:1], mask)


def test_figures_written_and_identical_on_rerun(tmp_path):
    ckpts = [str(weights_only(tmp_path, o)) for o in ("ls", "cimle", "mvae")]
    names = ["samples_ls", "samples_cimle", "samples_mvae", "samples_comparison"]
    for out in ("a", "b"):
        assert figures_main(["--checkpoints", *ckpts, "--out", str(tmp_path / out), "--images", "2"]) == 0
    for name in names:
        for ext in ("png", "pdf"):
            a, b = (tmp_path / d / f"{name}.{ext}" for d in ("a", "b"))
            assert a.stat().st_size > 1000
            assert a.read_bytes() == b.read_bytes(), f"{name}.{ext} differs on rerun"


def test_comparison_refuses_other_data(tmp_path):
    a = weights_only(tmp_path, "ls")
    cfg = tiny("cimle", "data.synthetic.classes=3")
    other = tmp_path / "other.pt"
    torch.save({"model": build_models(cfg, {}, "study", ("random",))["random"].state_dict(),
                "config": config_to_dict(cfg), "epoch": 0}, other)
    with pytest.raises(ValueError, match="data.synthetic"):
        figures_main(["--checkpoints", str(a), str(other), "--out", str(tmp_path)])


# --------------------------------------------------------------------------- Context-Completion


@pytest.fixture(scope="module")
def oracle():
    gen = SyntheticImageGenerator(3, 16, 4, 1, noise_std=0.1, distractor=1.0)  # a distractor the oracle strips
    return train_oracle(gen, n_train=3000, n_test=2000)


def _true_completions(gen, labels, signs):
    """``[k, B, N, C, p, p]``: patch n of completion s of image b shows mode (labels[b], signs[s, b, n])."""
    modes = gen.modes.reshape(gen.num_classes, 2, *gen.modes.shape[1:])
    out = modes[labels[None, :, None].expand_as(signs), signs]
    return out + gen.noise_std * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))


def test_oracle_is_accurate_and_rejects_the_mean(oracle):
    assert oracle.accuracy > 0.99 and oracle.bayes_agreement > 0.99
    assert oracle.clean_null_rate == 0.0 and oracle.mean_null_rate == 1.0
    gen = oracle.generator
    assert oracle.radius == pytest.approx(0.5 * gen.cue, rel=1e-5)  # half the distance from a mode to the class mean


def test_context_completion_oracle_perfect_and_mean_models(oracle):
    gen = oracle.generator
    b, n, k = 12, gen.num_patches, 24
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, gen.num_classes, (b,), generator=g)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, :10] = True
    signs = torch.randint(0, 2, (k, b, n), generator=g)
    # a perfect model: each completion a fresh draw from the true conditional
    res = {key: float(v.mean()) for key, v in completion_metrics(oracle, _true_completions(gen, labels, signs),
                                                                 mask, labels).items()}
    assert res == {"precision": 1.0, "recall": 1.0, "null_rate": 0.0, "empty_rate": 0.0}
    # the least-squares optimum: the conditional mean (zeros at mean_shift = 0), repeated
    zeros = torch.zeros(k, b, n, *gen.modes.shape[1:])
    res = {key: float(v.mean()) for key, v in completion_metrics(oracle, zeros, mask, labels).items()}
    assert res == {"precision": 0.0, "recall": 0.0, "null_rate": 1.0, "empty_rate": 1.0}
    # one true mode repeated k times (a deterministic but sharp model): precise, half the modes
    one = _true_completions(gen, labels, signs[:1].expand(k, b, n))
    res = completion_metrics(oracle, one, mask, labels)
    assert float(res["precision"].mean()) == 1.0 and float(res["recall"].mean()) == 0.5
    # sharp modes of the wrong class: found, but not plausible
    wrong = _true_completions(gen, (labels + 1) % gen.num_classes, signs)
    res = completion_metrics(oracle, wrong, mask, labels)
    assert float(res["precision"].mean()) == 0.0 and float(res["recall"].mean()) == 0.0
    assert float(res["null_rate"].mean()) == 0.0
    # halfway between the mean and a mode: rejected (closer to the mean than to the mode)
    res = completion_metrics(oracle, 0.4 * _true_completions(gen, labels, signs), mask, labels)
    assert float(res["null_rate"].mean()) == 1.0


# --------------------------------------------------------------------------- evaluate


def test_evaluate_samples_and_completion_rows(tmp_path):
    results = tmp_path / "results.csv"
    figs = tmp_path / "figs"
    rows = []
    for objective in ("ls", "cimle"):
        rows += evaluate(weights_only(tmp_path, objective), "samples,completion", results, progress=False,
                         verbose=False, on_samples=lambda drawing: draw_samples(drawing, figs))
    table = pd.read_csv(results)
    assert len(table) == len(rows)
    assert (figs / "samples_ls.png").is_file() and (figs / "samples_cimle.pdf").is_file()
    div = table[table.metric == "sample_diversity"].set_index(["objective", "encoder"]).value
    assert set(div.index) == {(o, e) for o in ("ls", "cimle") for e in ("pretrained", "random")}
    assert div["ls", "pretrained"] == 0.0 and div["ls", "random"] == 0.0
    assert div["cimle", "pretrained"] > 0 and div["cimle", "random"] > 0
    cc = table[table.protocol == "completion"]
    for metric in ("cc_precision", "cc_recall", "cc_null_rate", "cc_empty_rate"):
        sub = cc[cc.metric == metric]
        assert len(sub) == 4 and sub.value.between(0, 1).all()
    assert (cc[cc.metric == "cc_recall"].query("objective == 'ls'").value <= 0.5).all()  # one output per slot
    acc = cc[cc.metric == "oracle_accuracy"]
    assert len(acc) == 2 and (acc.value > 0.99).all() and set(acc.encoder) == {"pretrained"}
    assert (table.epochs == 2).all() and (table.train_seconds == 0.5).all()


def test_completion_needs_synthetic_data(tmp_path):
    cfg = load_config(None, [t for t in TINY if not t.startswith("data.")] + ["data.name=digits",
                                                                              "model.img_size=8"])
    model = build_models(cfg, {}, "study", ("random",))["random"]
    path = tmp_path / "digits.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 0}, path)
    with pytest.raises(EvaluationError, match="data.name=synthetic"):
        evaluate(path, "completion", None, progress=False, verbose=False)


def test_completion_on_same_mean_images_reports_floors_and_masked_losses(tmp_path):
    extra = ["objective=cimle", "cimle.select=token", "noise.scope=token",
             "noise.block=head", "cimle.k=2"]
    cfg = load_config(None, TINY + extra)
    model = build_models(cfg, {}, "study", ("random",))["random"]
    path = tmp_path / "hidden.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 0, "train_seconds": 0.1}, path)
    rows = evaluate(path, "completion", None, progress=False, verbose=False, random_baseline=False)
    values = {r["metric"]: r["value"] for r in rows}
    gen = SyntheticImageGenerator(2, 16, 4, 1, noise_std=0.1)
    assert values["bayes_floor"] == pytest.approx(gen.bayes_floor(8))  # 16 patches, ratio 0.5: 8 visible
    assert values["mode_floor"] == pytest.approx(gen.mode_floor(8))
    # an untrained model is above both floors
    assert values["masked_loss"] > values["bayes_floor"] > values["mode_floor"]
    assert values["masked_loss_nearest"] > values["mode_floor"]
    assert {r["cimle_select"] for r in rows} == {"token"}


def test_true_completions_are_found_by_the_oracle_and_keep_the_visible_patches():
    from study.data.datasets import build_eval_datasets
    from study.evaluation.context_completion import (completion_metrics, synthetic_generator, to_generator_layout,
                                                     true_completions)

    cfg = load_config(None, TINY)
    dataset = build_eval_datasets(cfg)[1]
    gen = synthetic_generator(cfg, dataset)
    batch = fixed_batch(cfg, 8, 0, dataset)
    true = true_completions(gen, dataset, batch, 6)  # [k, B, N, D]
    model = tiny_model("ls")[1]
    target = model.patchify(batch.images)
    m = batch.mask
    assert torch.allclose(true[:, ~m], target[~m].expand(6, *target[~m].shape))
    res = completion_metrics(train_oracle(gen, n_train=2000, n_test=500),
                             to_generator_layout(true, cfg.model.patch_size, cfg.model.in_chans), m, batch.labels)
    assert float(res["precision"].mean()) == 1.0 and float(res["recall"].mean()) > 0.9
    assert sample_diversity(true, m) > 1.0


# --------------------------------------------------------------------------- class-axis figure


@pytest.mark.parametrize("in_chans", [1, 3])
def test_class_axis_projections_put_the_truth_on_its_modes_and_the_wrong_class_at_zero(in_chans):
    from study.data.datasets import build_eval_datasets
    from study.evaluation.context_completion import synthetic_generator, true_completions
    from study.figures.synthetic_axes import axis_projections

    cfg = tiny("ls", f"model.in_chans={in_chans}")
    dataset = build_eval_datasets(cfg)[1]
    gen = synthetic_generator(cfg, dataset)
    batch = fixed_batch(cfg, 8, 0, dataset)
    true = true_completions(gen, dataset, batch, 4)  # model layout: a wrong layout would blur both
    own, other = axis_projections(gen, true, batch.labels, batch.mask)
    masked = int(batch.mask.sum())
    assert own.shape == (4 * masked,) and other.shape == (4 * masked * (gen.num_classes - 1),)
    assert ((own.abs() - gen.cue).abs() < 4 * gen.noise_std).all()  # +-cue plus the noise
    assert (other.abs() < 4 * gen.noise_std).all()
    own_wrong, _ = axis_projections(gen, true, 1 - batch.labels, batch.mask)  # two classes: the other one
    assert (own_wrong.abs() < 4 * gen.noise_std).all()


def test_class_axis_figure_is_identical_on_rerun_and_refuses_other_data(tmp_path):
    from study.figures.synthetic_axes import main as axes_main

    ckpts = [str(weights_only(tmp_path, o)) for o in ("ls", "cimle")]
    for out in ("a", "b"):
        assert axes_main(["--checkpoints", *ckpts, "--out", str(tmp_path / out)]) == 0
    for ext in ("png", "pdf"):
        a, b = (tmp_path / d / f"synthetic_class_axis.{ext}" for d in ("a", "b"))
        assert a.stat().st_size > 1000 and a.read_bytes() == b.read_bytes()
    cfg = tiny("cimle", "data.synthetic.classes=3")
    other = tmp_path / "other.pt"
    torch.save({"model": build_models(cfg, {}, "study", ("random",))["random"].state_dict(),
                "config": config_to_dict(cfg), "epoch": 0}, other)
    with pytest.raises(ValueError, match="data.synthetic"):
        axes_main(["--checkpoints", ckpts[0], str(other), "--out", str(tmp_path)])


# --------------------------------------------------------------------------- completions of real images


def test_nearest_visible_completions_find_the_image_itself_and_keep_its_visible_patches():
    from study.figures.completions import nearest_visible_completions

    cfg, model = tiny_model("ls")
    batch = fixed_batch(cfg, 6, 0)
    others = torch.randn(30, *batch.images.shape[1:])
    train = torch.cat([others, batch.images])  # every image is its own nearest neighbour
    out = nearest_visible_completions(model, train, batch, 3)  # [3, B, N, D]
    own = model.patchify(batch.images)
    assert out.shape == (3, *own.shape)
    assert torch.equal(out[0], own)
    assert torch.equal(out[:, ~batch.mask], own[~batch.mask].expand(3, *own[~batch.mask].shape))
    assert not torch.equal(out[1][batch.mask], own[batch.mask])  # the others are other images


def test_completions_figure_is_identical_on_rerun_and_names_every_diversity(tmp_path, monkeypatch):
    from study.figures import completions

    titles = []
    plot = completions.plot_comparison
    monkeypatch.setattr(completions, "plot_comparison",
                        lambda *a, title, **kw: titles.append(title) or plot(*a, title=title, **kw))
    ckpts = [str(weights_only(tmp_path, o)) for o in ("ls", "cimle", "mvae")]
    for out in ("a", "b"):
        assert completions.main(["--checkpoints", *ckpts, "--out", str(tmp_path / out)]) == 0
    for ext in ("png", "pdf"):
        a, b = (tmp_path / d / f"mnist_completions.{ext}" for d in ("a", "b"))
        assert a.stat().st_size > 1000 and a.read_bytes() == b.read_bytes()
    assert titles[0] == titles[1]
    for part in ("data ", "LS 0.00", "cIMLE-i ", "MVAE "):
        assert part in titles[0], titles[0]


def test_mnist_completions_keeps_weights_only_copies_of_every_variant(tmp_path, capsys):
    from experiments import mnist_completions as script
    from study.evaluation.setup import load_models
    from study.train.loop import pretrain

    runs = tmp_path / "runs"
    assert script.main(["--runs", str(runs), "--out", str(tmp_path / "ck")]) == 2
    assert capsys.readouterr().err.startswith("error: no run of ls, cimle_token, cimle_image, mvae")
    variants = {"ls": ["objective=ls"], "cimle_token": ["objective=cimle", "cimle.select=token", "noise.scope=token", "noise.block=head"],
                "cimle_image": ["objective=cimle"], "mvae": ["objective=mvae"]}
    for name, overrides in variants.items():
        pretrain(tiny(overrides[0].split("=")[1], "epochs=1", *overrides[1:]), runs / name / "run", progress=False)
    assert script.main(["--runs", str(runs), "--out", str(tmp_path / "ck"), "--results", str(tmp_path / "none.csv")]) == 0
    for name in variants:
        cfg, state, models = load_models(tmp_path / "ck" / f"mnist_{name}.pt")
        _, run_state, _ = load_models(runs / name / "run" / "checkpoint.pt", which=())
        assert script.variant(cfg) == name and set(state) <= {"model", "config", "epoch", "train_seconds", "provenance"}
        assert all(torch.equal(state["model"][k], run_state["model"][k]) for k in run_state["model"])
