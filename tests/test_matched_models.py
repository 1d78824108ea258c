"""Every committed comparison is on one model: each cIMLE (and Masked VAE) arm of every CPU study has a
least-squares twin with the same noise module, the same data, masks, schedule and seeds.

The twin of noise in the token-wise head is LS with that head fed z = 0; the twin of noise added at a
decoder block is LS on MAE's decoder (z = 0 through ``Linear(dim, Dd, bias=False)`` adds exactly 0)."""

from pathlib import Path

import pytest

from study.studies.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]
CPU_STUDIES = sorted(p.name for p in (ROOT / "experiments" / "sweeps").glob("*_cpu.yaml"))


def _model(settings: dict) -> str:
    return "head" if settings["noise"]["block"] == "head" else "plain"


def _shared(settings: dict) -> tuple:
    """What a pair must share besides the model: data, masks, schedule, architecture, seed."""
    return (repr(settings["data"]), repr(settings["mask"]), settings["epochs"], repr(settings["optim"]),
            repr(settings["model"]), settings["seed"], repr(settings.get("snapshot_epochs")))


@pytest.mark.parametrize("study", CPU_STUDIES)
def test_each_arm_has_a_least_squares_twin_on_its_model(study):
    points = expand(load_sweep(ROOT / "experiments" / "sweeps" / study))
    ls = {(_model(p.settings), _shared(p.settings)) for p in points if p.settings["objective"] == "ls"}
    arms = [p for p in points if p.settings["objective"] != "ls"]
    if study == "mnist_completions_cpu.yaml":
        pytest.skip("draws samples of one checkpoint per objective; it compares no accuracies")
    lonely = [p.slug for p in arms if (_model(p.settings), _shared(p.settings)) not in ls]
    assert lonely == [], f"{study}: arms without a least-squares twin on the same model"


def test_the_check_finds_an_arm_without_its_twin(tmp_path):
    (tmp_path / "s.yaml").write_text(
        (ROOT / "experiments" / "sweeps" / "k_axis_cpu.yaml").read_text()
        .replace("  - {objective: [ls], noise.scope: [token], noise.block: [head]}\n", ""))
    points = expand(load_sweep(tmp_path / "s.yaml", root=ROOT))
    ls = {(_model(p.settings), _shared(p.settings)) for p in points if p.settings["objective"] == "ls"}
    assert any((_model(p.settings), _shared(p.settings)) not in ls for p in points if p.settings["objective"] != "ls")
