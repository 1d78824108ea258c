"""Dependencies: the conda file and pyproject install the same things, constraints.txt pins versions
inside their ranges, and a timm without the internals the decoder reads is named."""

import tomllib
from pathlib import Path

import pytest
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


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt pins exact versions only, got {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_every_dependency_inside_pyproject_ranges():
    from packaging.requirements import Requirement

    pins = _constraints()
    for text in _pyproject_requirements():
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_makefile_installs_from_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c $(CONSTRAINTS) -e '.[dev,export,tensorboard]'" in makefile and "CONSTRAINTS := constraints.txt" in makefile


def test_timm_is_pinned_to_the_tested_range():
    from study.utils.compat import TIMM_TESTED

    reqs = {r.split(">")[0].split("<")[0].split("=")[0]: r for r in _pyproject_requirements()}
    assert reqs["timm"] == "timm" + TIMM_TESTED


def test_timm_attention_without_the_internals_we_read_is_named():
    import types

    import timm
    from timm.layers import Attention

    from study.utils.compat import ATTENTION_ATTRIBUTES, UnsupportedDependency, check_timm_attention

    attention = Attention(8, num_heads=2)
    check_timm_attention(attention)  # the installed timm has them
    older = types.SimpleNamespace(**{name: getattr(attention, name) for name in ATTENTION_ATTRIBUTES
                                     if name != "gate"})  # as an Attention from before timm had `gate`
    with pytest.raises(UnsupportedDependency, match=f"timm {timm.__version__} .* lacks gate.*pip install 'timm"):
        check_timm_attention(older)
