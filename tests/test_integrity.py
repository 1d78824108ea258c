"""Damaged or broken checkpoints stop every command with one error line; checkpoints load with plain torch."""

import shutil

import numpy as np
import pytest
import torch

from conftest import as_sets, one_error_line, tiny_overrides
from study.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from study.cli import main as cli_main
from study.config import load_config
from study.evaluation.features import extract_features
from study.evaluation.setup import EvaluationError
from study.train.loop import pretrain

# wide enough that an MLP weight spans 16 KiB: 4 KiB of damage lands inside one tensor record
TINY = tiny_overrides("epochs=2", "snapshot_epochs=[1]", size=16, width=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-epoch run folder with a snapshot after epoch 1."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli_main(["pretrain", "--out", str(out), "--quiet", *as_sets(TINY)]) == 0
    return out


def damage_weights(path) -> str:
    """Overwrite 4 KiB in the middle of the bytes of the checkpoint's largest encoder weight; return its name.

    The bytes are found by their content, so the damage lies inside that tensor's record of the zip."""
    model = load_checkpoint(path)["model"]
    name = max((k for k in model if k.startswith("encoder.")), key=lambda k: model[k].numel())
    raw = model[name].numpy().tobytes()
    assert len(raw) >= 3 * 4096, "the tensor is too small to hold the damage; widen the model"
    blob = bytearray(path.read_bytes())
    at = blob.find(raw)
    assert at >= 0 and blob.find(raw, at + 1) < 0
    start = at + (len(raw) - 4096) // 2
    blob[start:start + 4096] = np.random.default_rng(0).bytes(4096)
    path.write_bytes(bytes(blob))
    return name


def evaluate(checkpoint, results, *protocols):
    return cli_main(["evaluate", "--checkpoint", str(checkpoint), "--protocols", ",".join(protocols or ("knn",)),
                     "--results", str(results), "--figures", str(results.parent / "figures"), "--quiet"])


def test_damaged_tensor_bytes_stop_evaluate(run, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    shutil.copy(run / "checkpoint.pt", path)
    damage_weights(path)
    code = evaluate(path, tmp_path / "r.csv")
    one_error_line(capsys, code, str(path), "damaged")
    assert not (tmp_path / "r.csv").exists()


def test_damaged_checkpoint_stops_resume_and_names_the_snapshot(run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    damage_weights(folder / "checkpoint.pt")
    before = {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    code = cli_main(["pretrain", "--out", str(folder), "--resume", "--quiet", *as_sets([*TINY, "epochs=3"])])
    one_error_line(capsys, code, str(folder / "checkpoint.pt"), "damaged", "epoch_0001.pt")
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_checkpoints_load_with_plain_torch(run):
    for path in (run / "checkpoint.pt", run / "snapshots" / "epoch_0001.pt"):
        state = torch.load(path, weights_only=True)  # no safe_globals: tensors and plain data only
        assert isinstance(state["integrity"], str) and "integrity" not in load_checkpoint(path)
    numpy_state = torch.load(run / "checkpoint.pt", weights_only=True)["rng"][0]["numpy"]
    assert isinstance(numpy_state["key"], torch.Tensor)


def test_numpy_rng_state_round_trips_through_a_checkpoint(tmp_path):
    gen = torch.Generator()
    np.random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in the state
    save_checkpoint(tmp_path / "c.pt", {"rng": [rng_state(gen)]})
    expected = np.random.random(4)
    set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"][0], gen)
    assert np.array_equal(np.random.random(4), expected)


def _old_format(path) -> None:
    """Rewrite ``path`` as checkpoints without an integrity record, numpy's RNG state as its own tuple, are."""
    state = load_checkpoint(path)
    for rng in state["rng"]:
        numpy_state = rng["numpy"]
        if isinstance(numpy_state, dict):
            rng["numpy"] = (numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32),
                            numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    torch.save(state, path)


def test_old_format_checkpoint_loads_and_resumes_exactly(tmp_path, monkeypatch):
    import study.train.loop as train

    cfg = load_config(None, tiny_overrides("epochs=3", size=16, width=32))
    pretrain(cfg, tmp_path / "full", progress=False)
    real = train._train_one_epoch

    def dies_in_epoch_2(state, loader, augment, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt  # killed after the checkpoint of epoch 0
        return real(state, loader, augment, epoch, *args)

    monkeypatch.setattr(train, "_train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "part", progress=False)
    monkeypatch.setattr(train, "_train_one_epoch", real)
    _old_format(tmp_path / "part" / "checkpoint.pt")
    old = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    set_rng_state(old["rng"][0], torch.Generator())
    assert np.array_equal(np.random.get_state()[1], old["rng"][0]["numpy"][1])

    pretrain(cfg, tmp_path / "part", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)  # the resumed run writes the new format


def test_nan_weights_stop_evaluate(run, tmp_path, capsys):
    state = load_checkpoint(run / "checkpoint.pt")
    state["model"]["encoder.blocks.0.attn.qkv.weight"][3, 5] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", state)  # a valid integrity record: the file is intact, the weights not
    code = evaluate(tmp_path / "nan.pt", tmp_path / "r.csv")
    one_error_line(capsys, code, str(tmp_path / "nan.pt"), "encoder.blocks.0.attn.qkv.weight", "NaN")
    assert not (tmp_path / "r.csv").exists()


def test_non_finite_features_stop_evaluate_before_any_row(run, tmp_path, capsys):
    state = load_checkpoint(run / "checkpoint.pt")
    state["model"]["encoder.norm.weight"].fill_(3e38)  # finite, but the features overflow to inf
    save_checkpoint(tmp_path / "huge.pt", state)
    code = evaluate(tmp_path / "huge.pt", tmp_path / "r.csv", "knn", "samples")
    one_error_line(capsys, code, "features pretrained/train", "NaN or inf")
    assert not (tmp_path / "r.csv").exists()  # not even the rows of samples, which does not read features


class _NaNAtSeven(torch.nn.Module):
    """Features are the images themselves, NaN for the image holding 7."""

    def features(self, imgs, pool):
        return torch.where(imgs == 7, float("nan"), imgs)


def test_extract_features_names_the_first_non_finite_image():
    data = torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(EvaluationError, match="first: image 7"):
        extract_features(_NaNAtSeven(), data, batch_size=4, progress=False)
