"""Ad-hoc runs write under runs/ or where told; only make toy / make figures name the committed paths."""

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

import toy.regression_to_mean as rtm
from conftest import as_sets, tiny_overrides
from study.cli import main as cli_main
from study.config import config_to_dict, load_config
from study.figures.toy import FIGURE_NAME

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_overrides("epochs=1")
SMALL_TOY = ["--steps", "10", "--seeds", "1", "--strengths", "1", "--k", "2", "--no-progress"]


@pytest.fixture
def small_toy(monkeypatch):
    for name, size in [("PROBE_TRAIN", 100), ("PROBE_TEST", 100), ("TEST_SIZE", 100), ("ENERGY_SAMPLES", 20),
                       ("MEAN_SAMPLES", 2)]:  # plumbing, not numbers
        monkeypatch.setattr(rtm, name, size)


def test_toy_out_holds_everything_it_writes(tmp_path, monkeypatch, small_toy):
    monkeypatch.chdir(tmp_path)  # so a write to results/toy or figures would show up here
    rtm.main([*SMALL_TOY, "--out", "mine"])
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == sorted(
        [rtm.CSV_NAME, rtm.SUMMARY_NAME, f"{FIGURE_NAME}.png", f"{FIGURE_NAME}.pdf"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_toy_default_output_is_under_runs(tmp_path, monkeypatch, small_toy):
    monkeypatch.chdir(tmp_path)
    rtm.main(SMALL_TOY)
    assert (tmp_path / "runs" / "toy" / rtm.CSV_NAME).is_file()
    assert (tmp_path / "runs" / "toy" / f"{FIGURE_NAME}.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_make_toy_and_make_figures_name_the_committed_paths():
    # dry run: the commands make would execute
    toy = subprocess.run(["make", "-n", "toy"], capture_output=True, text=True, cwd=ROOT).stdout
    figures = subprocess.run(["make", "-n", "figures"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "--out results/toy --figures figures" in toy
    assert "--results results --out figures" in figures


def _weights_only(tmp_path):
    from study.methods.model import build_model

    cfg = load_config(None, TINY)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg), "epoch": 0}, path)
    return path


def test_evaluate_defaults_stay_out_of_results_and_figures(tmp_path, monkeypatch, capsys):
    ckpt = _weights_only(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--protocols", "samples", "--quiet"]) == 0
    # named by the run folder too (another run of the same objective does not overwrite it), path printed
    figure = tmp_path / "runs" / "figures" / f"samples_{tmp_path.name}_ls.png"
    assert figure.is_file() and f"samples figure: runs/figures/{figure.name}" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "runs" / "results.csv")) > 0
    assert not (tmp_path / "figures").exists() and not (tmp_path / "results").exists()


def test_pretrain_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own settings\n")
    (folder / "metrics.jsonl").write_text("mine\n")
    sets = as_sets(TINY)
    code = cli_main(["pretrain", "--out", str(folder), "--quiet", *sets])
    err = capsys.readouterr().err
    assert code == 2 and "holds no run" in err and err.count("\n") == 1, err
    assert (folder / "config.yaml").read_text() == "my: own settings\n"
    assert (folder / "metrics.jsonl").read_text() == "mine\n"
    # an empty folder is fine, and so is resuming a run folder
    (tmp_path / "empty").mkdir()
    assert cli_main(["pretrain", "--out", str(tmp_path / "empty"), "--quiet", *sets]) == 0
    assert cli_main(["pretrain", "--out", str(tmp_path / "empty"), "--resume", "--quiet", *sets]) == 0


def test_pretrain_ends_saying_where_the_checkpoint_is_and_how_to_evaluate_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["pretrain", "--out", str(run), *as_sets(TINY)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert str(run / "checkpoint.pt") in last and f"python -m study evaluate --checkpoint {run}" in last
    assert cli_main(["pretrain", "--out", str(tmp_path / "quiet"), "--quiet", *as_sets(TINY)]) == 0
    assert "evaluate" not in capsys.readouterr().out  # --quiet: nothing at all
