"""``compile: true`` holds: dynamo traces a training step's forward and loss as one graph.

The step draws its masks and noise before calling the model (``study.train.step``), so no
``torch.Generator`` enters the graph. ``torch._dynamo.explain`` traces without compiling
kernels, so these stay fast on the tiny model; timing a real compile is the benchmark's job.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
from study.config import load_config
from study.data.masking import build_mask_generator
from study.methods.model import build_model

CASES = {
    "ls": ["objective=ls"],
    "cimle image": ["objective=cimle"],
    "cimle token": ["objective=cimle", "cimle.select=token", "noise.scope=token", "noise.block=head"],
    "cimle adaln": ["objective=cimle", "noise.injection=adaln", "noise.scope=token"],
    "mvae": ["objective=mvae"],
    "ls sign flips": ["objective=ls", "data.sign_flip.p=0.5"],
}
BATCH = 8


def _step_inputs(extra: list[str], seed: int = 0):
    cfg = load_config(None, tiny_overrides(*extra))
    torch.manual_seed(0)
    model = build_model(cfg)
    make_mask = build_mask_generator(cfg.mask, cfg.patch_grid)
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(BATCH, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=gen)
    mask = make_mask(BATCH, generator=gen)  # [B, N]
    return model, make_mask.num_masked, gen, imgs, mask


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_traces_without_graph_breaks(case):
    model, num_masked, gen, imgs, mask = _step_inputs(CASES[case])
    draws = model.draw(BATCH, num_masked, gen)

    def step(imgs, mask, draws):  # as study.train.step calls the (compiled) model
        return model(imgs, mask, generator=gen, num_masked=num_masked, draws=draws).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(imgs, mask, draws)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("case", list(CASES))
def test_noise_drawn_before_the_step_is_the_noise_the_step_draws(case):
    """Drawing ahead takes the same numbers from the generator, in the same order: the same loss, bit for bit."""
    model, num_masked, _, imgs, mask = _step_inputs(CASES[case])
    inside = model(imgs, mask, generator=torch.Generator().manual_seed(5), num_masked=num_masked).loss
    draws = model.draw(BATCH, num_masked, torch.Generator().manual_seed(5))
    ahead = model(imgs, mask, num_masked=num_masked, draws=draws).loss
    assert torch.equal(inside, ahead)
