"""Real images with the conditional mean of the masked content erased by construction: each masked target
patch (or all of an image's) has its sign flipped with probability p, so E[y | x] = (1 - 2p) y."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from study.config import ConfigError, load_config
from study.methods.model import build_model


def _model(*extra: str):
    return build_model(load_config(None, tiny_overrides(*extra)))


@pytest.mark.parametrize("scope", ["patch", "image"])
def test_the_flipped_target_has_the_conditional_mean_one_minus_two_p_times_y(scope):
    model = _model("data.sign_flip.p=0.25", f"data.sign_flip.scope={scope}")
    target = torch.randn(4, 16, 8)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([target * model.flip_signs(target, generator) for _ in range(4000)])
    # the draws' mean projected on y: 1 - 2p = 0.5, up to sampling noise (sd about 0.004 here)
    assert abs(float((draws.mean(0) * target).sum() / target.pow(2).sum()) - 0.5) < 0.02
    signs = model.flip_signs(target, generator)
    assert signs.shape == ((4, 16, 1) if scope == "patch" else (4, 1, 1)) and set(signs.unique().tolist()) <= {-1, 1}


def test_without_flips_the_loss_and_the_generator_are_untouched():
    torch.manual_seed(0)
    plain, flipped_off = _model(), _model("data.sign_flip.p=0.0")
    flipped_off.load_state_dict(plain.state_dict())
    imgs, mask = torch.randn(8, 1, 8, 8), torch.zeros(8, 4, dtype=torch.bool)
    mask[:, :2] = True
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(plain(imgs, mask, g1).loss, flipped_off(imgs, mask, g2).loss)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_p_outside_zero_to_a_half_is_refused():
    with pytest.raises(ConfigError, match="data.sign_flip.p"):
        load_config(None, ["data.sign_flip.p=0.7"])


def test_least_squares_at_p_one_half_reaches_its_floor(tmp_path):
    """At p = 0.5 the best least-squares prediction is 0 whatever the encoder knows, so its loss floor is
    E[y^2] over masked target elements; a trained LS model's loss sits on it."""
    from study.data.datasets import build_datasets
    from study.train.loop import pretrain

    overrides = tiny_overrides("data.sign_flip.p=0.5", "epochs=40", "optim.blr=0.01", per_class=40)
    cfg = load_config(None, overrides)
    train, _ = build_datasets(cfg)
    imgs = torch.stack([train[i][0] for i in range(len(train))])
    model = build_model(cfg)
    floor = model.target(imgs).pow(2).mean().item()  # E[y^2]: masks are uniform over patches
    pretrain(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = sum(losses[-5:]) / 5
    # above the floor at the start, never below it (up to batch noise), within 10% of it after 40 epochs
    # (what is left is the prediction's own variance, still decaying toward 0)
    assert losses[0] > 1.3 * floor and min(losses) > 0.97 * floor and last < 1.1 * floor, (losses[0], last, floor)
