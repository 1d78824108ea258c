"""What the benchmark times: the training loop's own step of each model (transformers' ViTMAE behind our model's
call, so that the comparison runs the same step) and the parts of the cIMLE cost model ``E_fb + D_fb + k * D_f``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from experiments.bench.settings import Plan
from study.config import Config, with_overrides
from study.data.masking import mask_indices
from study.losses import cimle, least_squares, per_example_squared_error
from study.methods.model import build_model
from study.train.step import train_step, training_state
from study.utils.device import autocast, samples_that_fit, seed_everything
from study.utils.errors import UserError

HF_VARIANT = "transformers ViTMAE"  # the row name of transformers' model


class Trainer:
    """A model with the training loop's state on a fixed batch; ``build``: ours or :func:`transformers_mae`."""

    def __init__(self, cfg: Config, device: torch.device, imgs: Tensor, compile_model: bool = False,
                 build: Callable[[Config], nn.Module] = build_model) -> None:
        self.cfg, self.device, self.imgs = cfg, device, imgs
        seed_everything(cfg.seed)
        self.state = training_state(cfg, build(cfg).to(device), device)
        self.model, self.optimizer, self.make_mask = self.state.model, self.state.optimizer, self.state.make_mask
        self.model.train()
        if compile_model:
            self.state.net = torch.compile(self.model)
        for p in self.model.parameters():  # create the optimizer state: the first timed step is then steady
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step_fn(self, k: int | None = None) -> Callable[[], Tensor]:
        return lambda: train_step(self.state, self.imgs, k=k).loss.detach()


def import_transformers():
    try:  # here, not at the top: transformers is optional (the bench extra) and slow to import
        import transformers
    except ImportError as exc:
        raise UserError("the comparison with Hugging Face needs transformers: pip install -e '.[bench]' "
                                 f"(or pass --no-transformers) [{exc}]") from exc
    return transformers


class _HFModel(nn.Module):
    """transformers' model behind our model's call (it masks with its own noise: the step's mask goes unused)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def no_weight_decay(self) -> set[str]:  # our decay rule: none on tokens and embeddings
        skip = ("cls_token", "mask_token", "position_embeddings", "decoder_pos_embed")
        return {name for name, _ in self.named_parameters() if name.endswith(skip)}

    def draw(self, *_, **__) -> dict:  # the training step's draws: transformers' model draws its own
        return {}

    def forward(self, imgs: Tensor, mask: Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(loss=self.hf(pixel_values=imgs).loss)


def transformers_mae(cfg: Config) -> nn.Module:
    tf, m = import_transformers(), cfg.model
    hf_cfg = tf.ViTMAEConfig(
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, image_size=m.img_size, patch_size=m.patch_size,
        num_channels=m.in_chans, qkv_bias=True, decoder_num_attention_heads=m.decoder_heads,
        decoder_hidden_size=m.decoder_dim, decoder_num_hidden_layers=m.decoder_depth,
        decoder_intermediate_size=int(m.decoder_dim * m.mlp_ratio), mask_ratio=cfg.mask.ratio,
        norm_pix_loss=m.norm_pix_loss)
    hf_cfg._attn_implementation = "sdpa"
    return _HFModel(tf.ViTMAEForPreTraining(hf_cfg))


@dataclass
class Variant:
    step: Callable[[], Tensor]
    row: dict
    trainer: Trainer


def define_variants(plan: Plan, imgs: Tensor) -> tuple[dict[str, Variant], Trainer]:
    """The timed rows by name, and the cIMLE trainer (the cost model's parts run on it)."""
    cfg, block = plan.cfg, plan.cfg.noise.block

    def ours(objective: str) -> Trainer:
        return Trainer(with_overrides(cfg, f"objective={objective}"), plan.device, imgs)

    def row(tr: Trainer, objective: str, k: int | None = None, b: int | str | None = block) -> Variant:
        extra = {"chunk": cfg.cimle.chunk} if objective == "cimle" else {}
        return Variant(tr.step_fn(k), {"objective": objective, "k": k, "noise_block": b, **extra}, tr)

    ls, cimle_trainer, mvae = ours("ls"), ours("cimle"), ours("mvae")
    variants = {"ls": row(ls, "ls")} | {f"cimle k={k}": row(cimle_trainer, "cimle", k) for k in plan.args.k}
    variants["mvae"] = row(mvae, "mvae")
    if not plan.args.no_transformers:
        variants[HF_VARIANT] = row(Trainer(cfg, plan.device, imgs, build=transformers_mae), "ls (transformers)", b=None)
    return variants, cimle_trainer


class Components:
    """The cost model's parts on one cIMLE model (fixed mask and noise) through the objective's own decode."""

    def __init__(self, tr: Trainer) -> None:
        self.tr, model, imgs, device = tr, tr.model, tr.imgs, tr.device
        gen = torch.Generator().manual_seed(tr.cfg.seed + 17)
        self.mask = tr.make_mask(imgs.shape[0], generator=gen, device=device)  # [B, N]
        self.ids = mask_indices(self.mask, model.num_patches)
        with torch.no_grad(), autocast(tr.cfg.precision, device):
            target = model.target(imgs)  # [B, N, p*p*C]
            self.target = target.gather(1, self.ids.masked[..., None].expand(-1, -1, target.shape[-1]))
            latent = model.encoder(imgs, self.ids.keep)  # [B, 1+N_vis, D]
            hidden = model.decoder.prefix(latent, self.ids.restore)  # [B, 1+N, Dd]
            # the per-sample part of the decode; what it shares across samples is done here, once
            self.decode = model.decoder.masked_sampler(hidden, self.mask, self.ids.masked)
        self.latent = latent.detach()
        self.grad_latent = torch.randn_like(self.latent)
        self.z = torch.randn((imgs.shape[0], *model.noise_shape(self.ids.num_masked)), generator=gen).to(device)

    def encoder_fb(self) -> None:
        with autocast(self.tr.cfg.precision, self.tr.device):
            latent = self.tr.model.encoder(self.tr.imgs, self.ids.keep)
        latent.backward(self.grad_latent.to(latent.dtype))
        self.tr.model.zero_grad(set_to_none=True)

    def decoder_fb(self) -> None:
        decoder = self.tr.model.decoder
        latent = self.latent.detach().requires_grad_(True)  # gradient flows back to the encoder output
        with autocast(self.tr.cfg.precision, self.tr.device):
            hidden = decoder.prefix(latent, self.ids.restore)
            loss = least_squares(decoder.masked_sampler(hidden, self.mask, self.ids.masked)(self.z), self.target)
        loss.backward()
        self.tr.model.zero_grad(set_to_none=True)

    def decoder_f(self) -> None:
        with torch.no_grad(), autocast(self.tr.cfg.precision, self.tr.device):
            per_example_squared_error(self.decode(self.z), self.target)

    def selection(self, k: int, chunk: int | str | None) -> Callable[[], None]:
        gen, shape = torch.Generator().manual_seed(5), self.tr.model.noise_shape(self.ids.num_masked)
        if chunk == "auto":  # as the objective resolves it, from the free memory before the step
            chunk = samples_that_fit(k, self.tr.model.decoder.sample_bytes(*self.ids.masked.shape), self.tr.device)

        def run() -> None:
            with torch.no_grad(), autocast(self.tr.cfg.precision, self.tr.device):
                cimle(self.decode, self.target, k=k, noise_shape=shape, chunk=chunk, generator=gen,
                      select=self.tr.cfg.cimle.select)

        return run


def cost_components(plan: Plan, trainer: Trainer) -> tuple[dict[str, Callable[[], Any]], Components]:
    """The cost-model tasks by name, and their components (for the selection-memory grid)."""
    comps = Components(trainer)
    tasks: dict[str, Callable[[], Any]] = {"E_fb": comps.encoder_fb, "D_fb": comps.decoder_fb, "D_f": comps.decoder_f}
    if not plan.args.no_selection_timing:
        tasks[f"selection k={plan.args.k[-1]}"] = comps.selection(plan.args.k[-1], plan.cfg.cimle.chunk)
    return tasks, comps
