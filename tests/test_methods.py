"""The objective interface: a fourth objective trains from this file alone, and the built-in
objectives and noise placements keep their fixed-seed losses."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_overrides
from study.config import ConfigError, load_config
from study.methods import names, register
from study.methods.base import Context, Objective, PretrainOutput, randn_like_on
from study.losses import least_squares
from study.train.optim import param_groups
from study.train.loop import load_checkpoint, pretrain
from test_models import gen, make_batch, make_model, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


class NoiseScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_sigma = nn.Parameter(torch.zeros(()))


@register("ls_noisy_input")
class NoisyInputLeastSquares(Objective):
    """Least squares on a decoder whose input carries image noise of a learned scale."""

    def decoder_noise(self):
        return dataclasses.replace(self.cfg.noise, block=0, scope="image", injection="add")

    def modules(self):
        return {"noise_scale": NoiseScale()}

    def lr_scale(self, parameter_name):
        return 0.5 if parameter_name.startswith("noise_scale.") else 1.0

    def loss(self, model, ctx: Context) -> PretrainOutput:
        shape = (ctx.imgs.shape[0], *model.noise_shape(ctx.ids.num_masked))
        z = randn_like_on(shape, ctx.generator, ctx.hidden) * model.noise_scale.log_sigma.exp()
        loss = least_squares(model.decoder.suffix(ctx.hidden, z, ctx.mask), ctx.target, ctx.mask)
        return PretrainOutput(loss, {"recon": loss.detach()})


def test_an_objective_defined_here_trains_through_pretrain(tmp_path):
    assert "ls_noisy_input" in names()
    cfg = load_config(None, tiny_overrides("objective=ls_noisy_input", "epochs=2", size=16, width=16))
    row = pretrain(cfg, tmp_path, progress=False)
    assert math.isfinite(row["loss"])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["config"]["objective"] == "ls_noisy_input"
    weights = state["model"]
    assert "decoder.decoder_noise_proj.weight" in weights
    assert weights["noise_scale.log_sigma"].item() != 0.0  # the objective's own module was trained


def test_the_objective_sets_learning_rate_scales():
    cfg = load_config(None, tiny_overrides("objective=ls_noisy_input"))
    torch.manual_seed(0)
    from study.methods.model import build_model

    model = build_model(cfg)
    owner = {id(p): n for n, p in model.named_parameters()}
    for group in param_groups(model, cfg):
        ours = {owner[id(p)].startswith("noise_scale.") for p in group["params"]}
        assert ours in ({True}, {False})
        assert group["lr_scale"] == (0.5 if ours == {True} else 1.0)


def test_an_unknown_objective_is_refused_by_name():
    with pytest.raises(ConfigError, match="objective.*'ls'.*got 'lss'"):
        load_config(None, ["objective=lss"])


# Where objective names may appear: their own modules, the registry, and the analysis of a results
# table (the figures and the statistics name the baseline and the arms they compare). Nowhere else may
# code test a name: the loop, the step, the models, the data, the sweeps and the commands stay blind.
NAMED_BY_DESIGN = ("study/methods/", "study/utils/registry.py", "study/figures/", "study/evaluation/statistics.py")


def _branches_on_names(source: str) -> list[int]:
    """Lines that test an objective name: comparisons (==, !=, in), ``match`` cases, subscripts and
    ``.get``/``.pop`` by name, and dict literals keyed by names (lookup tables)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Compare, ast.MatchValue)):
            constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
        elif isinstance(node, ast.Subscript):
            constants = [node.slice.value] if isinstance(node.slice, ast.Constant) else []
        elif isinstance(node, ast.Dict):
            constants = [k.value for k in node.keys if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "get", "pop", "setdefault"):
            constants = [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
        else:
            continue
        if any(isinstance(v, str) and v in names() for v in constants):
            found.append(node.lineno)
    return found


def test_no_module_outside_the_methods_branches_on_objective_names():
    files = [p for p in sorted((ROOT / "study").rglob("*.py"))
             if not p.relative_to(ROOT).as_posix().startswith(NAMED_BY_DESIGN)]
    assert len(files) > 40, "the package was not read"
    found = [f"{p.relative_to(ROOT)}:{line}" for p in files for line in _branches_on_names(p.read_text())]
    assert found == []


@pytest.mark.parametrize("branch", [
    'if cfg.objective == "cimle":\n    pass',
    'if cfg.objective in ("ls", "mvae"):\n    pass',
    'match cfg.objective:\n    case "cimle":\n        pass',
    'chunk = {"cimle": 4}[cfg.objective]',
    'chunk = table.get("mvae", 1)',
])
def test_the_branching_check_catches_every_form(branch):
    assert _branches_on_names(branch)


# the fixed-seed loss and gradient norm of every objective and noise placement
# (objective/block/scope/injection); a refactor of the model must leave them unchanged. They are
# compared to 1e-6 relative, not bit for bit, because CPU kernels round differently across hosts
# (AMX, AVX-512); any change of behaviour moves them far more.
REFERENCE = {
    "ls/head/token/add": (1.2522506713867188, 1.6911921928955902),
    "ls/0/image/add": (1.736631989479065, 2.898269906181064),
    "cimle/0/image/add": (1.7116895914077759, 2.0883263661846905),
    "mvae/0/image/add": (1.6748583316802979, 1.5060502053261458),
    "cimle/0/image/adaln": (1.736631989479065, 3.012487201858145),
    "mvae/0/image/adaln": (1.7434484958648682, 3.0198337302355887),
    "cimle/0/token/add": (1.6784849166870117, 1.9989193135180712),
    "mvae/0/token/add": (1.6748583316802979, 1.5060502053261458),
    "cimle/0/token/adaln": (1.736631989479065, 2.9773170112509515),
    "mvae/0/token/adaln": (1.7434484958648682, 3.0198337302355887),
    "cimle/1/image/add": (1.724133014678955, 2.8080699421895283),
    "mvae/1/image/add": (1.722930669784546, 1.9208565673828093),
    "cimle/1/image/adaln": (1.736631989479065, 2.995523294687088),
    "mvae/1/image/adaln": (1.747808814048767, 3.0118984632331607),
    "cimle/1/token/add": (1.7002273797988892, 2.3857160643877457),
    "mvae/1/token/add": (1.722930669784546, 1.9208565673828093),
    "cimle/1/token/adaln": (1.736631989479065, 2.9701483982457546),
    "mvae/1/token/adaln": (1.747808814048767, 3.0118984632331607),
    "cimle/2/image/add": (1.6725808382034302, 2.6256115186071836),
    "mvae/2/image/add": (1.7092901468276978, 2.1412286509491705),
    "cimle/2/image/adaln": (1.736631989479065, 2.984822420925606),
    "mvae/2/image/adaln": (1.7440366744995117, 3.0183482962177988),
    "cimle/2/token/add": (1.6973577737808228, 2.4952271618547175),
    "cimle-token/2/token/add": (1.6414012908935547, 2.5067778761378086),
    "mvae/2/token/add": (1.7092901468276978, 2.1412286509491705),
    "cimle/2/token/adaln": (1.736631989479065, 2.9649285749132646),
    "cimle-token/2/token/adaln": (1.7366321086883545, 2.9649285749132646),
    "mvae/2/token/adaln": (1.7440366744995117, 3.0183482962177988),
    "cimle/head/image/add": (1.2519246339797974, 1.6901438403259579),
    "mvae/head/image/add": (1.456619381904602, 2.2552817230838578),
    "cimle/head/token/add": (1.2838784456253052, 1.7299567802608933),
    "cimle-token/head/token/add": (1.2421305179595947, 1.6696749460226512),
    "mvae/head/token/add": (1.456619381904602, 2.2552817230838578),
}


def _cases():
    yield "ls", dict(block="head", scope="token")
    yield "ls", dict(block=0, scope="image")
    for block, scope, injection in itertools.product([0, 1, 2, "head"], ["image", "token"], ["add", "adaln"]):
        if block == "head" and injection == "adaln":
            continue  # the head takes the noise as an input: injection does not apply
        kw = dict(block=block, scope=scope, injection=injection)
        yield "cimle", kw
        if scope == "token" and block in (2, "head"):
            yield "cimle-token", kw
        yield "mvae", kw


@pytest.mark.parametrize("objective,placement", list(_cases()),
                         ids=[f"{o}/{kw['block']}/{kw['scope']}/{kw.get('injection', 'add')}" for o, kw in _cases()])
def test_fixed_seed_loss_of_each_objective_and_noise_placement(objective, placement):
    cfg = tiny_cfg("cimle" if objective == "cimle-token" else objective, norm_pix=True, **placement)
    if objective == "cimle-token":
        cfg = dataclasses.replace(cfg, cimle=dataclasses.replace(cfg.cimle, select="token"))
    model = make_model(cfg, seed=1)
    imgs, mask = make_batch(seed=2)
    out = model(imgs, mask, gen(3))
    out.loss.backward()
    grad_norm = sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None).sqrt().item()
    key = f"{objective}/{placement['block']}/{placement['scope']}/{placement.get('injection', 'add')}"
    loss, norm = REFERENCE[key]
    assert out.loss.item() == pytest.approx(loss, rel=1e-6, abs=0)
    assert grad_norm == pytest.approx(norm, rel=1e-6, abs=0)
