"""A user's routine mistakes end in one line ``error: ...`` and exit status 2, no traceback (``--debug`` shows it)."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import as_sets, one_error_line, tiny_overrides
from study.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_overrides("epochs=1")


def sets(*items):
    return as_sets([*TINY, *items])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run folder."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli_main(["pretrain", "--out", str(out), "--quiet", *sets()]) == 0
    return out


def _png_folder(root, per_class=4):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(per_class):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def _folder_sets(root, *extra):
    return sets("data.name=imagefolder", f"data.root={root}", "model.in_chans=3", "optim.batch_size=2", *extra)


def test_run_exists(run, capsys):
    code = cli_main(["pretrain", "--out", str(run), "--quiet", *sets()])
    one_error_line(capsys, code, "already holds a run", "--resume")


def test_resume_with_a_changed_config(run, capsys):
    code = cli_main(["pretrain", "--out", str(run), "--resume", "--quiet", *sets("cimle.k=3")])
    one_error_line(capsys, code, "cimle.k: 2 (checkpoint) vs 3 (now)")


def test_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: ls\nmodel:\n  depth: [1, 2\n")
    code = cli_main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "x")])
    line = one_error_line(capsys, code, str(bad), "line")
    assert "<unicode string>" not in line
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--set", "cimle.k=[1"])
    one_error_line(capsys, code, "--set cimle.k=[1")


def test_missing_and_empty_image_folders(tmp_path, capsys):
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--quiet", *_folder_sets(tmp_path / "nowhere")])
    one_error_line(capsys, code, "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--quiet", *_folder_sets(tmp_path / "empty")])
    one_error_line(capsys, code, "empty", "class")
    (tmp_path / "classes" / "a").mkdir(parents=True)  # class folders without image files
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--quiet", *_folder_sets(tmp_path / "classes")])
    one_error_line(capsys, code, "classes")


def test_bad_image(tmp_path, capsys):
    _png_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"not a png" * 10)
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--quiet", *_folder_sets(tmp_path / "imgs")])
    one_error_line(capsys, code, "broken.png", "on_bad_image=skip")


def test_out_that_is_a_file_or_below_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    code = cli_main(["pretrain", "--out", str(afile), "--quiet", *sets()])
    one_error_line(capsys, code, str(afile), "is a file")
    code = cli_main(["pretrain", "--out", str(afile / "run"), "--quiet", *sets()])
    one_error_line(capsys, code, "cannot write to --out")
    assert afile.read_text() == "keep me"


def test_unreadable_checkpoint(run, tmp_path, capsys):
    garbage = tmp_path / "checkpoint.pt"
    garbage.write_bytes(b"\x80\x04 not a torch file")
    with warnings.catch_warnings(record=True) as caught:  # a user would see them on stderr
        warnings.simplefilter("always")
        code = cli_main(["evaluate", "--checkpoint", str(garbage), "--protocols", "knn", "--results",
                         str(tmp_path / "r.csv")])
    assert not caught, [str(w.message) for w in caught]
    line = one_error_line(capsys, code, "cannot read checkpoint", str(garbage), "unpickler stopped at")
    assert "weights_only" not in line  # torch's advice to load the file unsafely is not ours to give
    # the same in a run folder that --resume reads
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run / "config.yaml").read_text())
    (broken / "checkpoint.pt").write_bytes(b"\x80\x04 truncated")
    code = cli_main(["pretrain", "--out", str(broken), "--resume", "--quiet", *sets()])
    one_error_line(capsys, code, "cannot read checkpoint")


@pytest.mark.parametrize("content, cause", [(b"", "the file is empty"),
                                            (b"root:x:0:0:root:/root:/bin/bash\n", "not the zip archive")])
def test_checkpoint_that_is_not_a_torch_file(tmp_path, capsys, content, cause):
    # torch's own cause here is KeyError '101', IndexError or an empty EOFError: the line must say what is wrong
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    code = cli_main(["evaluate", "--checkpoint", str(path), "--protocols", "knn", "--results", str(tmp_path / "r.csv")])
    one_error_line(capsys, code, "cannot read checkpoint", cause)


def test_checkpoint_of_another_architecture(run, tmp_path, capsys):
    code = cli_main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--protocols", "knn",
                     "--results", str(tmp_path / "r.csv"), "--set", "model.embed_dim=16"])
    one_error_line(capsys, code, "do not fit", "model.*")
    assert not (tmp_path / "r.csv").exists()


def test_debug_shows_the_traceback_and_plain_run_does_not(tmp_path):
    from study.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {depth: [1\n")
    args = ["pretrain", "--config", str(bad), "--out", str(tmp_path / "x")]
    plain = subprocess.run([sys.executable, "-m", "study", *args], capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr and plain.stderr.strip().count("\n") == 0, plain.stderr
    with pytest.raises(ConfigError, match="not valid YAML"):  # --debug lets the exception through
        cli_main(["--debug", *args])
    with pytest.raises(ConfigError, match="not valid YAML"):  # also after the command
        cli_main([*args, "--debug"])


def test_unwritable_samples_figures_folder_fails_before_any_protocol(run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = cli_main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--protocols", "knn,samples",
                     "--results", str(tmp_path / "r.csv"), "--figures", str(afile / "figs")])
    one_error_line(capsys, code, "--figures")
    assert not (tmp_path / "r.csv").exists()


def test_a_run_folder_stands_for_its_checkpoint_and_features_are_mean_pooled(run, tmp_path, capsys):
    import pandas as pd

    results = tmp_path / "results.csv"
    assert cli_main(["evaluate", "--checkpoint", str(run), "--protocols", "knn", "--results", str(results),
                     "--quiet", "--no-random-baseline"]) == 0
    table = pd.read_csv(results)
    assert set(table.pool) == {"mean"}  # the README's headline pooling is the default
    assert set(table.checkpoint) == {str(run / "checkpoint.pt")}
    out = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    code = cli_main(["evaluate", "--checkpoint", str(tmp_path), "--results", str(results)])
    one_error_line(capsys, code, str(tmp_path), "without checkpoint.pt")


def test_batch_larger_than_the_training_set_is_refused_before_training(tmp_path, capsys):
    # TINY: 2 classes x 20 images, a fifth held out: 32 training images
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--quiet", *sets("optim.batch_size=64")])
    one_error_line(capsys, code, "optim.batch_size=64", "32 training images", "at most 32")
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--quiet",
                     *sets("optim.batch_size=16", "optim.accum_steps=4")])  # 2 batches an epoch: no optimiser step
    one_error_line(capsys, code, "optim.accum_steps=4", "32 training images")
    assert not (tmp_path / "x").exists()


def test_in_chans_that_does_not_match_an_image_folder_is_refused(tmp_path, capsys):
    _png_folder(tmp_path / "imgs")
    code = cli_main(["pretrain", "--out", str(tmp_path / "x"), "--quiet",
                     *_folder_sets(tmp_path / "imgs", "model.in_chans=1")])
    one_error_line(capsys, code, "model.in_chans=1", "3-channel", "set model.in_chans=3")
    assert not (tmp_path / "x").exists()
