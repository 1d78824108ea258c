"""The conda file and pyproject must install the same things."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(meta["dependencies"]) | set(meta["optional-dependencies"]["dev"])


def _conda_pip_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, "environment.yml needs exactly one pip: section"
    return set(pip[0]["pip"])


def test_environment_yml_matches_pyproject():
    ours, conda = _pyproject_requirements(), _conda_pip_requirements()
    assert ours == conda, f"only in pyproject: {sorted(ours - conda)}; only in environment.yml: {sorted(conda - ours)}"


def test_torch_is_capped_at_the_local_wheels():
    reqs = {r.split(">")[0].split("<")[0].split("=")[0]: r for r in _pyproject_requirements()}
    assert "<=2.14.1" in reqs["torch"]
    assert "<=0.29.1" in reqs["torchvision"]
