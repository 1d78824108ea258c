"""transformers' side of the benchmark: ViTMAEForPreTraining at our configuration, its trainer, parameter counts.

The model gets the config's image/patch/channels, widths, depths, heads, MLP
sizes, mask ratio and ``norm_pix_loss``, SDPA attention and LayerNorm eps
1e-6; its AdamW follows our weight-decay rule. ``transformers`` is an optional
dependency (the ``bench`` extra), imported only when this side runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from experiments.bench.variants import prime_optimizer
from study.config import Config
from study.runtime import adamw, autocast, grad_scaler, seed_everything
from study.step import base_lr_of

__all__ = ["import_transformers", "build_transformers_mae", "count_parameters", "HFTrainer", "parameter_counts",
           "transformers_info"]

_OUR_GROUPS = {"encoder.": "encoder", "decoder.decoder_noise": "noise input", "decoder.": "decoder",
               "variational_encoder.": "variational encoder"}
_HF_GROUPS = {"vit.": "encoder", "decoder.": "decoder"}


def import_transformers():
    """``(transformers, ViTMAEConfig, ViTMAEForPreTraining)``, or an ImportError that says how to install them."""
    try:  # here, not at the top: transformers is optional and slow to import
        import transformers
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError as exc:
        raise ImportError(
            "the benchmark against Hugging Face needs transformers: pip install -e '.[bench]' "
            f"(or pass --no-transformers) [{exc}]"
        ) from exc
    return transformers, ViTMAEConfig, ViTMAEForPreTraining


def build_transformers_mae(cfg: Config) -> nn.Module:
    """transformers' ``ViTMAEForPreTraining`` with our config's sizes, SDPA attention, LayerNorm eps 1e-6."""
    _, ViTMAEConfig, ViTMAEForPreTraining = import_transformers()
    m = cfg.model
    hf_cfg = ViTMAEConfig(
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
        image_size=m.img_size, patch_size=m.patch_size, num_channels=m.in_chans, qkv_bias=True,
        decoder_num_attention_heads=m.decoder_heads, decoder_hidden_size=m.decoder_dim,
        decoder_num_hidden_layers=m.decoder_depth, decoder_intermediate_size=int(m.decoder_dim * m.mlp_ratio),
        mask_ratio=cfg.mask.ratio, norm_pix_loss=m.norm_pix_loss,
    )
    hf_cfg._attn_implementation = "sdpa"
    return ViTMAEForPreTraining(hf_cfg)


def _hf_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The rule of :func:`study.step.param_groups`: no decay on biases, norms, tokens, position embeddings."""
    skip = ("cls_token", "mask_token", "position_embeddings", "decoder_pos_embed")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and not name.endswith(".bias") and not name.endswith(skip) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


class HFTrainer:
    """transformers' model with its AdamW, stepping on a fixed batch (the LS objective, its own masking)."""

    def __init__(self, cfg: Config, device: torch.device, imgs: Tensor, compile_model: bool) -> None:
        seed_everything(cfg.seed)
        self.model = build_transformers_mae(cfg).to(device)
        self.model.train()
        self.optimizer = adamw(_hf_param_groups(self.model, cfg.optim.weight_decay), base_lr_of(cfg),
                               (cfg.optim.beta1, cfg.optim.beta2), device)
        self.scaler = grad_scaler(cfg.precision, device)
        self.cfg, self.device, self.imgs = cfg, device, imgs
        self.net: nn.Module = torch.compile(self.model) if compile_model else self.model
        prime_optimizer(self.model, self.optimizer)

    def step_fn(self, eager: bool = False) -> Callable[[], Tensor]:
        opt, scaler, imgs = self.optimizer, self.scaler, self.imgs
        net = self.model if eager else self.net

        def step() -> Tensor:  # as study.step.train_step does without accumulation
            with autocast(self.cfg.precision, self.device):
                loss = net(pixel_values=imgs).loss
            scaler.scale(loss).backward()
            if self.cfg.optim.clip_grad is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step


def count_parameters(model: nn.Module, groups: dict[str, str] | None = None) -> dict:
    """Total and trainable parameter counts, and per top-level group (``groups``: prefix -> label)."""
    out = {"total": 0, "trainable": 0, "frozen": 0, "groups": {}}
    for name, p in model.named_parameters():
        n = p.numel()
        out["total"] += n
        out["trainable" if p.requires_grad else "frozen"] += n
        label = name.split(".")[0]
        if groups:
            label = next((lab for pre, lab in groups.items() if name.startswith(pre)), label)
        out["groups"][label] = out["groups"].get(label, 0) + n
    return out


def parameter_counts(ours: dict[str, nn.Module], hf_model: nn.Module | None) -> dict:
    """Counts of our models (``ours``: report key -> model) and of transformers' model, with their difference."""
    params = {key: count_parameters(model, _OUR_GROUPS) for key, model in ours.items()}
    if hf_model is None:
        return params
    params["transformers"] = count_parameters(hf_model, _HF_GROUPS)
    diff = params["ours_ls"]["total"] - params["transformers"]["total"]
    params["ls_minus_transformers"] = diff
    params["explanation"] = (
        "identical counts: same tensors (our fused qkv = their q/k/v; frozen sin-cos position embeddings "
        "are parameters with requires_grad=False in both)" if diff == 0 else
        "counts differ; see the per-group counts"
    ) + ("; cIMLE adds the noise input (Linear(noise.dim, decoder_dim, bias=False) for 'add', "
         "adaLN maps for 'adaln'), the Masked VAE adds its variational encoder")
    return params


def transformers_info(hf_model: nn.Module | None, step_s: float | None) -> dict:
    """Whether transformers ran, and its version, attention implementation and median step."""
    info: dict = {"used": hf_model is not None}
    if hf_model is not None:
        tf_mod, _, _ = import_transformers()
        info.update(version=tf_mod.__version__, attn_implementation=hf_model.config._attn_implementation,
                    step_s=step_s)
    return info
