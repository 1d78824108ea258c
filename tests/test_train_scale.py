"""What a multi-GPU run relies on: DDP without the unused-parameter search, one loader for the whole run,
checkpoints as often as asked, and a device and precision stated or refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import image_folder_config, make_image_folder, make_train_val_folders, tiny_overrides
from study.config import load_config
from study.utils.errors import UserError
from study.train.step import train_step
from study.train.loop import _build, load_checkpoint, pretrain

PLACEMENTS = [
    ["objective=ls"],
    ["objective=ls", "noise.block=head"],
    ["objective=cimle"],
    ["objective=cimle", "noise.scope=token"],
    ["objective=cimle", "noise.block=1"],
    ["objective=cimle", "noise.block=head"],
    ["objective=cimle", "noise.injection=adaln"],
    ["objective=mvae"],
]


@pytest.mark.parametrize("extra", PLACEMENTS, ids=lambda e: ",".join(e))
def test_every_parameter_gets_a_gradient_each_step(extra):
    """DDP runs with find_unused_parameters=False, which needs a gradient for every parameter every step."""
    cfg = load_config(None, tiny_overrides(*extra, "optim.accum_steps=2"))
    state, train_set = _build(cfg, check_data=False)
    imgs = torch.stack([train_set[i][0] for i in range(8)])
    train_step(state, imgs, last_micro_step=False)  # no optimiser step: the gradients stay for inspection
    missing = [n for n, p in state.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_fp16_on_cpu_is_refused_before_any_work(tmp_path):
    cfg = load_config(None, tiny_overrides("precision=fp16"))
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        pretrain(cfg, tmp_path / "run", progress=False)
    assert not any((tmp_path / "run").glob("*"))  # nothing written


def test_the_run_says_which_device_it_trains_on(tmp_path, capsys):
    pretrain(load_config(None, tiny_overrides("epochs=1", "device=auto")), tmp_path / "run", progress=False)
    assert "training on cpu" in capsys.readouterr().out


def test_checkpoint_every_n_epochs_and_after_the_last(tmp_path, monkeypatch):
    import study.train.loop as train

    written = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, obj, **kw: (written.append((path.name, obj["epoch"])),
                                                                           real(path, obj, **kw)))
    pretrain(load_config(None, tiny_overrides("epochs=5", "checkpoint_every=2")), tmp_path / "run", progress=False)
    assert written == [("checkpoint.pt", 1), ("checkpoint.pt", 3), ("checkpoint.pt", 4)]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 5  # every epoch is logged


def test_resume_after_a_skipped_checkpoint_redoes_the_unsaved_epochs(tmp_path, monkeypatch):
    import study.train.loop as train

    cfg = load_config(None, tiny_overrides("epochs=5", "checkpoint_every=3"))
    pretrain(cfg, tmp_path / "full", progress=False)
    real = train._train_one_epoch

    def dies_in_epoch_5(state, loader, augment, epoch, *args):
        if epoch == 4:
            raise KeyboardInterrupt  # killed: epoch 4 is logged, only epoch 3 is checkpointed
        return real(state, loader, augment, epoch, *args)

    monkeypatch.setattr(train, "_train_one_epoch", dies_in_epoch_5)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "part", progress=False)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 2
    monkeypatch.setattr(train, "_train_one_epoch", real)
    pretrain(cfg, tmp_path / "part", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(r)["epoch"] for r in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4]


def _folder_cfg(root, *extra):
    return image_folder_config(root, "optim.batch_size=6", *extra)


@pytest.fixture
def folder(tmp_path):
    return make_train_val_folders(tmp_path / "imgs", classes=2, per_class=6, val_per_class=2)


def test_folder_crops_do_not_depend_on_workers_and_resume_exactly(folder, tmp_path):
    """Persistent workers keep their RNG across epochs; the per-image seeds make that invisible."""
    pretrain(_folder_cfg(folder, "data.num_workers=0"), tmp_path / "w0", progress=False)
    pretrain(_folder_cfg(folder, "data.num_workers=2"), tmp_path / "w2", progress=False)
    pretrain(_folder_cfg(folder, "data.num_workers=2", "epochs=1"), tmp_path / "cut", progress=False)
    pretrain(_folder_cfg(folder, "data.num_workers=2"), tmp_path / "cut", resume=True, progress=False)
    ref = load_checkpoint(tmp_path / "w0" / "checkpoint.pt")["model"]
    for run in ("w2", "cut"):
        other = load_checkpoint(tmp_path / run / "checkpoint.pt")["model"]
        assert all(torch.equal(ref[k], other[k]) for k in ref), run


def test_train_and_val_with_different_classes_are_refused(folder):
    from study.data.datasets import build_datasets

    make_image_folder(folder / "train", classes=3, per_class=6)
    with pytest.raises(UserError, match="different class folders"):
        build_datasets(_folder_cfg(folder))


def test_effective_batch_sets_the_accumulation_for_the_processes_at_hand(tmp_path, capsys):
    from study.train.optim import base_lr_of, with_effective_batch

    cfg = load_config(None, tiny_overrides("optim.batch_size=4", "optim.effective_batch=16"))
    assert [with_effective_batch(cfg, w).optim.accum_steps for w in (1, 2, 4)] == [4, 2, 1]
    assert len({base_lr_of(with_effective_batch(cfg, w), w) for w in (1, 2, 4)}) == 1  # lr follows the batch
    with pytest.raises(UserError, match="effective_batch=16 is not a multiple"):
        with_effective_batch(cfg, 3)
    pretrain(load_config(None, tiny_overrides("epochs=1", "optim.batch_size=4", "optim.effective_batch=8")),
             tmp_path / "run", progress=False)
    assert "batch 4 x 1 process(es) x 2 accumulation step(s) = 8" in capsys.readouterr().out
    assert load_config(tmp_path / "run" / "config.yaml").optim.accum_steps == 2


def test_subset_keeps_the_same_images_in_the_folder_and_in_its_pack(folder, tmp_path):
    from study.data.datasets import build_datasets, build_eval_datasets
    from study.data.image_folders import RobustImageFolder
    from study.data.packed import pack_folder

    pack_folder(RobustImageFolder(folder / "train"), tmp_path / "pack", size=16, progress=False)
    plain, _ = build_eval_datasets(_folder_cfg(folder, "data.subset=5"))
    packed, _ = build_datasets(_folder_cfg(folder, "data.subset=5", f"data.packed={tmp_path / 'pack'}"))
    assert len(plain) == len(packed) == 5 and plain.targets == packed.targets
    with pytest.raises(UserError, match="larger than the training split"):
        build_datasets(_folder_cfg(folder, "data.subset=500"))
