"""The CUDA path, checked without a GPU: no host syncs in a training step, fused AdamW, noise on the device.

A step's host syncs are counted by ``tests/host_sync.py``
on PyTorch's ``meta`` device: like CUDA it is not the CPU, so every CPU-only
check is skipped, and any value read back to the host would fail there.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
from host_sync import SyncCounter
from study.config import load_config
from study.data.masking import build_mask_generator
from study.data.packed import DeviceCrops
from study.methods.model import build_model
from study.losses import cimle
from study.train.optim import adamw, lr_at, param_groups, set_lr
from study.train.step import TrainingState, train_step
from study.utils.device import Dist, grad_scaler

OBJECTIVES = {
    "ls": ["objective=ls"],
    "cimle image": ["objective=cimle"],
    "cimle token": ["objective=cimle", "cimle.select=token", "noise.scope=token", "noise.block=head"],
    "mvae": ["objective=mvae"],
}
# host syncs of one model step (forward + backward) off the CPU, per objective
EXPECTED_SYNCS_PER_STEP = {name: 0 for name in OBJECTIVES}


def _model_and_batch(extra: list[str], device: str):
    cfg = load_config(None, tiny_overrides(*extra))
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    make_mask = build_mask_generator(cfg.mask, cfg.patch_grid)
    mask = make_mask(4, generator=torch.Generator().manual_seed(0)).to(device)  # [B, N]
    imgs = torch.randn(4, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size).to(device)
    return model, make_mask, mask, imgs


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_a_step_off_the_cpu_makes_the_expected_host_syncs(objective):
    model, make_mask, mask, imgs = _model_and_batch(OBJECTIVES[objective], "meta")
    counter = SyncCounter()
    with counter:
        out = model(imgs, mask, num_masked=make_mask.num_masked)  # as study.train.loop passes it
        out.loss.backward()
    assert sum(counter.hits.values()) == EXPECTED_SYNCS_PER_STEP[objective], dict(counter.hits)


class _MetaGenerator(torch.Generator):
    """A CPU generator that says it is on the meta device, as the loop's generator is on the training device: the
    study's draws then happen on meta (which accepts any generator) and are not copied from the host."""

    @property
    def device(self) -> torch.device:
        return torch.device("meta")


def _meta_state(cfg) -> TrainingState:
    """``training_state`` on the meta device. Two parts differ, because meta has no generator and no fused AdamW
    kernel: the mask/noise generator is :class:`_MetaGenerator`, and the optimizer is for-each SGD, which keeps no
    step count; fused AdamW's own step is counted by the AdamW test below."""
    device = torch.device("meta")
    model = build_model(cfg).to(device)
    return TrainingState(cfg=cfg, model=model, net=model, optimizer=torch.optim.SGD(param_groups(model, cfg), lr=1.0,
                         momentum=0.9, foreach=True), scaler=grad_scaler(cfg.precision, device),
                         make_mask=build_mask_generator(cfg.mask, cfg.patch_grid),
                         mask_noise_gen=_MetaGenerator().manual_seed(0), device=device, dist_info=Dist(), base_lr=1e-3)


# host syncs of a whole step per mask kind. Block masks are left out: BEiT's loop runs in numpy on the host, from a
# seed read off the device (one .item(), which meta cannot answer) and uploaded from pageable memory, so they cost
# two syncs a step on a GPU (docs/scale.md)
SYNCS_PER_MASK_KIND = {"random": 0, "noise": 0}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_a_whole_training_step_with_augmentation_makes_no_host_sync(objective):
    assert _whole_step_syncs(OBJECTIVES[objective]) == {}


@pytest.mark.parametrize("kind", list(SYNCS_PER_MASK_KIND))
def test_a_whole_step_s_host_syncs_per_mask_kind(kind):
    extra = ["mask.filter=red"] if kind == "noise" else []
    hits = _whole_step_syncs(["objective=ls", f"mask.kind={kind}", *extra])
    assert sum(hits.values()) == SYNCS_PER_MASK_KIND[kind], hits


def _whole_step_syncs(extra: list[str]) -> dict[str, int]:
    """What study.train.loop does per step after the upload: the pack's crops, the lr, mask and noise draws, forward,
    backward, clipping, the optimizer step and the loss and stats sums. The first step creates the optimizer state
    and copies the crops' normalisation once; the second is counted."""
    cfg = load_config(None, tiny_overrides(*extra, "model.img_size=16", "model.in_chans=3", "optim.clip_grad=1.0"))
    state, crops = _meta_state(cfg), DeviceCrops(cfg.model.img_size)
    pixels = torch.zeros(8, 24, 24, 3, dtype=torch.uint8, device="meta")  # [B, S, S, 3]: a packed batch
    sizes = torch.tensor([[24, 24], [20, 24], [24, 18], [12, 12]] * 2).to("meta")  # [B, 2]
    loss_sum, stats_sum = torch.zeros((), device="meta"), {}

    def loop_step(step: int) -> None:
        nonlocal loss_sum
        imgs = crops((pixels, sizes), state.mask_noise_gen)  # [B, 3, H, W]
        set_lr(state.optimizer, lr_at(step / 10, cfg, state.base_lr))
        result = train_step(state, imgs)
        loss_sum = loss_sum + result.loss.detach()
        for key, value in result.stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value.detach().float()

    loop_step(0)
    counter = SyncCounter()
    with counter:
        loop_step(1)
    assert loss_sum.device.type == "meta" and state.optimizer.state  # the step ran through the optimizer
    return dict(counter.hits)


def test_the_pack_s_crops_on_the_device_make_no_host_sync():
    """The augmentation of a packed batch, after its first call (which copies the normalisation once)."""
    crops = DeviceCrops(16)
    pixels = torch.zeros(4, 24, 24, 3, dtype=torch.uint8, device="meta")  # [B, S, S, 3]
    sizes = torch.tensor([[24, 24], [20, 24], [24, 18], [12, 12]]).to("meta")  # [B, 2]
    crops((pixels, sizes))
    counter = SyncCounter()
    with counter:
        out = crops((pixels, sizes))
    assert out.shape == (4, 3, 16, 16) and sum(counter.hits.values()) == 0, dict(counter.hits)


def test_the_counter_sees_blocking_uploads_and_not_asynchronous_ones():
    pageable, counter = torch.ones(3), SyncCounter()
    with counter:
        pageable.to("meta")
        pageable.to(device="meta", non_blocking=True)  # pageable memory: the copy waits anyway
        pageable.to(torch.float64)  # no device change
    assert sum(counter.hits.values()) == 2, dict(counter.hits)


def test_the_counter_sees_the_syncs_it_should():
    """On the CPU the same step reads the mask count back and checks it: the counter is not blind."""
    model, _, mask, imgs = _model_and_batch(OBJECTIVES["ls"], "cpu")
    counter = SyncCounter()
    with counter:
        model(imgs, mask).loss.backward()
    assert any("ids_from_mask" in where for where in counter.hits), dict(counter.hits)


def _step_syncs(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    for p in params:
        p.grad = torch.ones_like(p)
    counter = SyncCounter()
    with counter:
        opt.step()
    return sum(counter.hits.values())


def test_adamw_is_fused_on_cuda_and_its_step_makes_no_host_sync():
    params = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(4)]
    groups = [{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:], "weight_decay": 0.0}]
    fused = adamw(groups, 1e-3, (0.9, 0.95), "cuda")  # the CUDA rule; fused AdamW also runs on CPU tensors
    assert fused.defaults["fused"] is True
    _step_syncs(fused, params)  # the first step creates the state
    assert _step_syncs(fused, params) == 0
    default = adamw([{"params": params, "weight_decay": 0.0}], 1e-3, (0.9, 0.95), "cpu")
    assert not default.defaults.get("fused")  # CPU keeps the path the committed studies were made with
    _step_syncs(default, params)
    assert _step_syncs(default, params) == len(params)  # one .item() of the step count per parameter


def test_cimle_noise_is_drawn_on_the_generators_device(monkeypatch):
    """The noise comes from the generator's device (study.train.loop makes it on the training device)."""
    seen = []
    randn = torch.randn

    def recording(*args, **kwargs):
        seen.append(torch.device(kwargs.get("device", "cpu")))
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", recording)
    target = torch.zeros(2, 3, 4, device="meta")
    cimle(lambda z: target + z[:, None, :4].sum(), target, k=2, noise_shape=(4,),
          generator=torch.Generator(device="cpu").manual_seed(0))
    assert seen == [torch.device("cpu")]
    seen.clear()
    cimle(lambda z: target + z[:, None, :4].sum(), target, k=2, noise_shape=(4,))
    assert seen == [torch.device("meta")]  # no generator: on the target's device


def test_training_draws_masks_and_noise_with_a_generator_on_the_training_device():
    from study.train.loop import _build

    state, _ = _build(load_config(None, tiny_overrides("objective=cimle")), check_data=False)
    assert state.mask_noise_gen.device == state.device


def test_cimle_chunk_auto_fits_half_the_free_cuda_memory(monkeypatch):
    """``cimle.chunk: auto``: the free memory (here 100 samples' worth) halved, over the decoder's bytes per sample."""
    from study.utils.device import samples_that_fit

    cfg = load_config(None, tiny_overrides("objective=cimle", "cimle.chunk=auto", "cimle.k=64"))
    model = build_model(cfg)
    per_sample = model.decoder.sample_bytes(8, 2)
    assert per_sample > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * per_sample, 200 * per_sample))
    assert samples_that_fit(64, per_sample, torch.device("cuda")) == 50
    assert samples_that_fit(8, per_sample, torch.device("cuda")) == 8  # never more than k
    assert samples_that_fit(64, 1000 * per_sample, torch.device("cuda")) == 1  # never fewer than one
    assert samples_that_fit(64, per_sample, torch.device("cpu")) == 64  # off CUDA: all k
    assert model.method.draw(model, 8, 2, None, None, torch.device("cpu"))["chunk"] == 64
