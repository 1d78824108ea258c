"""The finetune recipe's settings: the presets, layer decay and betas in the optimizer, a trainable
position embedding that leaves the source's alone, and one row per finetune seed."""

import argparse
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

import study.evaluation.finetune as ft
from conftest import one_error_line, tiny_overrides
from study.cli.evaluate import _finetune_settings, add_arguments, run_from_args
from study.config import config_to_dict, load_config
from study.evaluation.finetune import (FINETUNE_PRESETS, ViTClassifier, finetune, finetune_settings,
                                       set_pos_embed_training)
from study.evaluation.run import evaluate
from study.evaluation.setup import EvaluationError
from study.methods.model import build_model
from study.models.encoder import ViTEncoder
from study.train.optim import linear_scaled_lr

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 3


def _encoder(pos_embed: str = "sincos") -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=DEPTH, num_heads=2,
                      pos_embed=pos_embed)


def _stripes(n: int, seed: int) -> TensorDataset:
    """Two classes, horizontal or vertical stripes under noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    x[y == 0, :, ::2, :] += 1.0
    x[y == 1, :, :, ::2] += 1.0
    return TensorDataset(x, y)


def _recording_optimizer(monkeypatch) -> list:
    """Keep every optimizer :func:`finetune` builds, to read the groups it trained with."""
    built = []

    def record(model, s, batch):
        opt = original(model, s, batch)
        built.append((model, opt))
        return opt

    original = ft.finetune_optimizer
    monkeypatch.setattr(ft, "finetune_optimizer", record)
    return built


def _groups_by_name(model, opt) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group for group in opt.param_groups for p in group["params"]}


def _mae_layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit`` (util/lr_decay.py) on the classifier's parameter names."""
    name = name.removeprefix("encoder.")
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


# --------------------------------------------------------------------------- presets


def test_the_gpu_preset_picks_mae_lites_vit_t_recipe_by_width():
    vit_t = finetune_settings("gpu", embed_dim=192)
    assert vit_t == FINETUNE_PRESETS["vit-t"] == finetune_settings("vit-t")
    assert (vit_t.layer_decay, vit_t.epochs, vit_t.batch_size, vit_t.blr) == (0.85, 300, 1024, 1e-3)
    assert (vit_t.mixup, vit_t.cutmix, vit_t.label_smoothing, vit_t.reprob, vit_t.drop_path) == (0.2, 0, 0, 0, 0)
    assert vit_t.train_pos_embed and vit_t.seeds == ()
    for width in (384, 768, None):  # wider, or not said: MAE's ViT-B recipe, as the gpu preset always was
        assert finetune_settings("gpu", embed_dim=width) == FINETUNE_PRESETS["vit-b"]
    assert FINETUNE_PRESETS["vit-b"].layer_decay == 0.65
    assert finetune_settings("gpu", embed_dim=192, epochs=3).epochs == 3
    with pytest.raises(EvaluationError, match="valid: .*'gpu'.*'vit-t'"):
        finetune_settings("vit-tiny")


def test_finetune_seeds_are_checked():
    assert finetune_settings("cpu", seeds=[2, 0]).seeds == (2, 0)
    assert finetune_settings("cpu", seeds=4).seeds == (4,)
    for bad, words in (((0, 0), "list each seed once"), ((-1,), ">= 0"), ((True,), ">= 0"), (("1",), ">= 0")):
        with pytest.raises(EvaluationError, match=words):
            finetune_settings("cpu", seeds=bad)


# --------------------------------------------------------------------------- optimizer


def test_layer_decay_betas_and_lr_reach_the_optimizer(monkeypatch):
    built = _recording_optimizer(monkeypatch)
    s = finetune_settings("vit-t", epochs=1, batch_size=8, warmup_epochs=0)
    finetune(_encoder(), _stripes(16, 0), _stripes(8, 1), 2, s, progress=False, max_steps=1)
    (model, opt), = built
    groups = _groups_by_name(model, opt)
    assert model.num_layers() == DEPTH
    # MAE's layer ids under timm's rule (scale = decay ** (last id - id)): the head 1, block 0 decay ** depth
    last = max(_mae_layer_id(name, DEPTH) for name in groups)
    for name, group in groups.items():
        assert group["lr_scale"] == pytest.approx(s.layer_decay ** (last - _mae_layer_id(name, DEPTH))), name
    block0, head = groups["encoder.blocks.0.mlp.fc1.weight"], groups["head.weight"]
    ratio = s.layer_decay ** (_mae_layer_id("head.weight", DEPTH) - _mae_layer_id("encoder.blocks.0.attn.qkv.weight",
                                                                                   DEPTH))
    assert block0["lr"] / head["lr"] == pytest.approx(ratio)
    assert opt.defaults["lr"] == pytest.approx(linear_scaled_lr(s.blr, 8)) and opt.defaults["betas"] == s.betas
    assert block0["weight_decay"] == s.weight_decay
    assert groups["encoder.pos_embed"]["weight_decay"] == groups["encoder.cls_token"]["weight_decay"] == 0.0


def test_a_trained_position_embedding_is_a_copy_the_source_keeps_its_own(monkeypatch):
    built = _recording_optimizer(monkeypatch)
    enc = _encoder("sincos")
    source = enc.pos_embed
    before = source.detach().clone()
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    s = finetune_settings("cpu", epochs=1, batch_size=8, warmup_epochs=0, train_pos_embed=True)
    finetune(enc, _stripes(24, 0), _stripes(8, 1), 2, s, progress=False, max_steps=3)
    (model, opt), = built
    trained = model.encoder.pos_embed
    assert trained is not source and trained.requires_grad
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    assert not torch.equal(trained.detach(), before)
    assert any(p is trained for group in opt.param_groups for p in group["params"])
    # the source's tensor (and so a pretrained model's, or the checkpoint's) is untouched
    assert torch.equal(source, before) and not source.requires_grad and source.grad is None
    assert torch.equal(state["pos_embed"], before)


def test_a_fixed_position_embedding_stays_out_of_the_optimizer(monkeypatch):
    built = _recording_optimizer(monkeypatch)
    enc = _encoder("learned")
    before = enc.pos_embed.detach().clone()
    s = finetune_settings("cpu", epochs=1, batch_size=8, warmup_epochs=0, train_pos_embed=False)
    finetune(enc, _stripes(24, 0), _stripes(8, 1), 2, s, progress=False, max_steps=3)
    (model, opt), = built
    assert not model.encoder.pos_embed.requires_grad and model.encoder.pos_embed.grad is None
    assert torch.equal(model.encoder.pos_embed.detach(), before)
    assert "encoder.pos_embed" not in _groups_by_name(model, opt)


def test_set_pos_embed_training_leaves_a_matching_parameter_as_it_is():
    enc = _encoder("learned")
    table = enc.pos_embed
    set_pos_embed_training(enc, True)
    assert enc.pos_embed is table
    ViTClassifier(enc, 2)  # the classifier itself changes nothing
    assert enc.pos_embed is table and table.requires_grad


# --------------------------------------------------------------------------- seeds


def _tiny_checkpoint(tmp_path, *extra) -> Path:
    cfg = load_config(None, tiny_overrides(*extra))
    torch.manual_seed(123)  # not the config's seed: the pretrained encoder differs from the random one
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg), "epoch": 0}, path)
    return path


def _top1(table: pd.DataFrame) -> pd.DataFrame:
    return table[table.metric == "finetune_top1"]


def test_two_finetune_seeds_write_a_row_each_for_either_encoder(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, "seed=3")
    results = tmp_path / "results.csv"
    s = finetune_settings("cpu", batch_size=8, seeds=(0, 1))
    evaluate(ckpt, "finetune", results, finetune=s, finetune_max_steps=2, progress=False, verbose=False)
    table = pd.read_csv(results)
    top1 = _top1(table)
    assert sorted(zip(top1.encoder, top1.finetune_seed)) == [("pretrained", 0), ("pretrained", 1),
                                                              ("random", 0), ("random", 1)]
    assert set(top1.seed) == {3}  # the pretraining seed
    assert len(table[table.metric == "finetune_seconds"]) == 4
    assert "ft_seeds" not in table.columns and set(table.ft_train_pos_embed) == {True}

    # a point of a once_per_seed sweep without the baseline: the seeds of the pretrained encoder only
    rows = evaluate(ckpt, "finetune", None, finetune=s, finetune_max_steps=2, random_baseline=False,
                    progress=False, verbose=False)
    assert sorted((r["encoder"], r["finetune_seed"]) for r in rows if r["metric"] == "finetune_top1") == [
        ("pretrained", 0), ("pretrained", 1)]

    # no seeds: one finetune, seeded with the pretraining seed
    rows = evaluate(ckpt, "finetune", None, finetune=finetune_settings("cpu", batch_size=8), finetune_max_steps=2,
                    random_baseline=False, progress=False, verbose=False)
    assert [r["finetune_seed"] for r in rows if r["metric"] == "finetune_top1"] == [3]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def test_the_finetune_seeds_flag(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path)
    results = tmp_path / "results.csv"
    common = ["--checkpoint", str(ckpt), "--protocols", "finetune", "--results", str(results), "--preset", "cpu",
              "--finetune-epochs", "1", "--no-random-baseline", "--quiet"]
    assert _cli(common + ["--finetune-seeds", "0,1"]) == 0
    top1 = _top1(pd.read_csv(results))
    assert sorted(top1.finetune_seed) == [0, 1] and set(top1.ft_epochs) == {1}
    one_error_line(capsys, _cli(common + ["--finetune-seeds", "1,1"]), "list each seed once")

    # gpu reads the encoder's width from the checkpoint: the tiny one gets the ViT-T recipe
    args = argparse.Namespace(checkpoint=str(ckpt), config=None, overrides=[], finetune_epochs=None,
                              finetune_seeds=[0, 1])
    assert _finetune_settings(args, "gpu") == finetune_settings("vit-t", seeds=(0, 1))


def test_the_run_notebook_passes_finetune_seeds(tmp_path):
    from study.studies.notebook import execute_notebook

    (tmp_path / "base.yaml").write_text("objective: ls\nepochs: 1\noptim:\n  warmup_epochs: 1\n")
    execute_notebook(ROOT / "notebooks" / "run.py", tmp_path / "run.ipynb", cwd=ROOT, parameters=dict(
        config=str(tmp_path / "base.yaml"), overrides=tiny_overrides(), out=str(tmp_path / "run"),
        results=str(tmp_path / "results.csv"), sweep="tiny", point="ls_s0", protocols="finetune", pools="mean",
        random_baseline=False, finetune_epochs=1, finetune_seeds="0,2"))
    top1 = _top1(pd.read_csv(tmp_path / "results.csv"))
    assert sorted(top1.finetune_seed) == [0, 2] and set(top1.encoder) == {"pretrained"}
