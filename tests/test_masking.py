"""Masks: exact counts, determinism, spatial structure per kind, MAE index round-trip, errors, figure."""

import math

import pytest
import torch

from study.config import MaskConfig
from study.data.masking import MaskGenerator, build_mask_generator, clustering_score, ids_from_mask

KINDS = [("random", "green"), ("block", "green"),
         ("noise", "red"), ("noise", "green"), ("noise", "blue"), ("noise", "white")]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- counts and shape


@pytest.mark.parametrize("kind,filt", KINDS)
@pytest.mark.parametrize("grid", [(14, 14), (4, 4), (3, 7), (1, 5)])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_exact_count_every_row(kind, filt, grid, ratio):
    n = grid[0] * grid[1]
    expected = math.floor(ratio * n + 0.5)
    if not 0 < expected < n:
        with pytest.raises(ValueError, match="ratio"):
            MaskGenerator(kind, ratio, grid, filter=filt)
        return
    gen = MaskGenerator(kind, ratio, grid, filter=filt)
    assert gen.num_masked == expected
    mask = gen(16, generator=_gen(0))
    assert mask.dtype == torch.bool and mask.shape == (16, n) and mask.device.type == "cpu"
    assert (mask.sum(dim=1) == expected).all()


def test_block_tops_up_when_blocks_cannot_fill():
    # min block larger than the grid: no rectangle fits, every patch comes from the random top-up
    gen = MaskGenerator("block", 0.5, (3, 3), block_min_patches=50)
    assert (gen(8, generator=_gen(0)).sum(1) == gen.num_masked).all()


def test_zero_batch_and_device():
    gen = MaskGenerator("noise", 0.75, (4, 4), filter="red")
    assert gen(0).shape == (0, 16)
    assert gen(2, device="cpu").device.type == "cpu"


def test_build_from_config():
    gen = build_mask_generator(MaskConfig(kind="noise", ratio=0.6, filter="blue", block_min_patches=3), (5, 6))
    assert (gen.kind, gen.filter, gen.block_min_patches, gen.grid, gen.num_masked) == ("noise", "blue", 3, (5, 6), 18)
    assert build_mask_generator(MaskConfig(), (4, 4)).num_masked == 12  # defaults: random, 0.75


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind,filt", KINDS)
def test_same_seed_same_mask_different_seed_different(kind, filt):
    gen = MaskGenerator(kind, 0.6, (6, 5), filter=filt)
    a, b, c = gen(8, _gen(3)), gen(8, _gen(3)), gen(8, _gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = _gen(3)
    first, second = gen(8, g), gen(8, g)  # the generator advances
    assert torch.equal(first, a) and not torch.equal(first, second)
    assert not torch.equal(a[0], a[1])  # images of a batch differ


def test_global_rng_when_no_generator():
    gen = MaskGenerator("block", 0.5, (6, 6))
    torch.manual_seed(11)
    a = gen(4)
    torch.manual_seed(11)
    assert torch.equal(a, gen(4))


# --------------------------------------------------------------------------- spatial structure


def _score(kind, filt, grid=(14, 14), ratio=0.5, batch=64, seed=0):
    return clustering_score(MaskGenerator(kind, ratio, grid, filter=filt)(batch, _gen(seed)), grid)


def test_random_scores_about_one():
    assert abs(_score("random", "green") - 1.0) < 0.05
    assert abs(_score("noise", "white") - 1.0) < 0.05


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_clustered_and_dispersed_kinds(ratio):
    rnd = _score("random", "green", ratio=ratio)
    assert _score("block", "green", ratio=ratio) > rnd + 0.1
    assert _score("noise", "red", ratio=ratio) > rnd + 0.1
    assert _score("noise", "green", ratio=ratio) > rnd + 0.03
    assert _score("noise", "blue", ratio=ratio) < rnd - 0.03


def test_clustering_on_small_grid():
    grid = (4, 4)
    assert _score("block", "green", grid, batch=256) > _score("random", "green", grid, batch=256) + 0.1
    assert _score("noise", "blue", grid, batch=256) < _score("random", "green", grid, batch=256) - 0.05


def test_clustering_score_known_masks():
    grid = (4, 4)
    half = torch.zeros(1, 16, dtype=torch.bool)
    half[0, :8] = True  # top two rows: row 0 all neighbours masked; row 1: 2/3, 3/4, 3/4, 2/3
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None]).remainder(2).bool().reshape(1, 16)
    expected_random = 7 / 15
    raw_half = clustering_score(half, grid, normalize=False)
    assert raw_half == pytest.approx((4 + 2 / 3 + 3 / 4 + 3 / 4 + 2 / 3) / 8)
    assert clustering_score(half, grid) == pytest.approx(raw_half / expected_random)
    assert clustering_score(half, grid) > 1.0
    assert clustering_score(checker, grid) == 0.0  # no masked patch touches another
    with pytest.raises(ValueError, match="patches per row"):
        clustering_score(half, (3, 3))


# --------------------------------------------------------------------------- MAE indices


@pytest.mark.parametrize("kind,filt", [("random", "green"), ("block", "green"), ("noise", "red")])
def test_ids_round_trip(kind, filt):
    grid, batch, dim = (3, 5), 4, 2
    mask = MaskGenerator(kind, 0.6, grid, filter=filt)(batch, _gen(1))
    n = grid[0] * grid[1]
    x = torch.randn(batch, n, dim)
    ids_keep, ids_masked, ids_restore = ids_from_mask(mask)
    assert ids_keep.shape == (batch, n - 9) and ids_masked.shape == (batch, 9) and ids_restore.shape == (batch, n)
    assert (ids_keep.diff(dim=1) > 0).all() and (ids_masked.diff(dim=1) > 0).all()
    assert not mask.gather(1, ids_keep).any() and mask.gather(1, ids_masked).all()
    visible = x.gather(1, ids_keep[..., None].expand(-1, -1, dim))
    masked = x.gather(1, ids_masked[..., None].expand(-1, -1, dim))
    restored = torch.cat([visible, masked], 1).gather(1, ids_restore[..., None].expand(-1, -1, dim))
    assert torch.equal(restored, x)


def test_ids_from_mask_rejects_bad_masks():
    with pytest.raises(ValueError, match="same number"):
        ids_from_mask(torch.tensor([[True, False, False], [True, True, False]]))
    with pytest.raises(TypeError, match="bool"):
        ids_from_mask(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        ids_from_mask(torch.zeros(3, dtype=torch.bool))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args,kwargs,word", [
    (("stripes", 0.5, (4, 4)), {}, "kind"),
    (("noise", 0.5, (4, 4)), {"filter": "pink"}, "filter"),
    (("random", 0.0, (4, 4)), {}, "ratio"),
    (("random", 1.0, (4, 4)), {}, "ratio"),
    (("random", -0.2, (4, 4)), {}, "ratio"),
    (("random", float("nan"), (4, 4)), {}, "ratio"),
    (("random", 0.01, (4, 4)), {}, "ratio"),  # rounds to 0 masked
    (("random", 0.99, (4, 4)), {}, "ratio"),  # rounds to all masked
    (("random", 0.5, (0, 4)), {}, "grid"),
    (("random", 0.5, (4,)), {}, "grid"),
    (("random", 0.5, (4.0, 4)), {}, "grid"),
    (("block", 0.5, (4, 4)), {"block_min_patches": 0}, "block_min_patches"),
])
def test_bad_arguments(args, kwargs, word):
    with pytest.raises(ValueError, match=word):
        MaskGenerator(*args, **kwargs)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        MaskGenerator("random", 0.5, (4, 4))(-1)


# --------------------------------------------------------------------------- figure


def test_figure_writes_both_files_deterministically(tmp_path):
    from study.figures.masks import main, plot_mask_examples

    paths = plot_mask_examples(tmp_path / "a", grid=(4, 4), ratios=(0.5, 0.75), seed=0)
    assert sorted(p.name for p in paths) == ["masks.pdf", "masks.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    main(["--out", str(tmp_path / "b"), "--grid", "4", "4", "--ratios", "0.5", "0.75"])  # a rerun
    for name in ("masks.png", "masks.pdf"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


def test_config_and_generator_count_masked_patches_by_one_rule():
    """Halves round up everywhere: at 16 patches, ratio 1/32 masks floor(0.5 + 0.5) = 1 patch, not round's 0."""
    from study.config import load_config, num_masked

    assert num_masked(0.5, 49) == 25 and num_masked(1 / 32, 16) == 1
    cfg = load_config(None, ["data.name=synthetic", "model.img_size=16", "model.patch_size=4", "mask.ratio=0.03125"])
    assert build_mask_generator(cfg.mask, (4, 4)).num_masked == 1
