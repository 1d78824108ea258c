"""ViT encoder that runs on the visible patches only (He et al. 2022).

Parameter names follow timm's ``VisionTransformer`` (and the encoder half of the
published MAE ``MaskedAutoencoderViT``): ``patch_embed.proj``, ``cls_token``,
``pos_embed`` ``[1, 1+N, D]``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``. A published MAE ``.pth`` therefore loads with :func:`load_pretrained_encoder`.
"""

from __future__ import annotations

import argparse
import pickle
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from study.models.attention import Attention
from study.models.pos_embed import sincos_2d

__all__ = ["ViTEncoder", "load_pretrained_encoder", "init_mae_weights", "position_embedding"]

_layer_norm = partial(nn.LayerNorm, eps=1e-6)  # as timm ViT / MAE


def init_mae_weights(module: nn.Module) -> None:
    """MAE-style init for one module: xavier-uniform Linear (zero bias), unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_patch_embed(proj: nn.Conv2d) -> None:
    """Xavier-uniform on the conv kernel seen as a ``[D, p*p*C]`` linear map."""
    w = proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def position_embedding(dim: int, grid_size: tuple[int, int], kind: Literal["sincos", "learned"]) -> nn.Parameter:
    """``[1, 1+N, dim]`` with the class token's slot first: fixed 2-D sin-cos (MAE) or learned (ViT init)."""
    if kind == "sincos":
        return nn.Parameter(sincos_2d(dim, grid_size, cls_token=True)[None], requires_grad=False)
    if kind == "learned":
        table = torch.empty(1, 1 + grid_size[0] * grid_size[1], dim)
        return nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
    raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {kind!r}")


class ViTEncoder(nn.Module):
    """ViT with a class token and 2-D sin-cos (or learned) position embeddings.

    ``forward(imgs, ids_keep)`` embeds all patches, keeps the ``ids_keep`` ones
    (the visible patches, in the given order), prepends the class token and
    returns the normed tokens ``[B, 1+N_vis, D]``.
    """

    def __init__(
        self,
        img_size: int = 28,
        patch_size: int = 7,
        in_chans: int = 1,
        embed_dim: int = 64,
        depth: int = 3,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        pos_embed: Literal["sincos", "learned"] = "sincos",
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches  # N
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # [1, 1, D]
        # stored in the state dict like the published checkpoints, whether fixed or learned
        self.pos_embed = position_embedding(embed_dim, self.patch_embed.grid_size, pos_embed)  # [1, 1+N, D]
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth rule (timm)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rates[i],
                  norm_layer=_layer_norm, attn_layer=Attention)
            for i in range(depth)
        )
        self.norm = _layer_norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        init_patch_embed(self.patch_embed.proj)
        nn.init.normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if name != "patch_embed.proj":
                init_mae_weights(module)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward(self, imgs: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """``imgs [B, C, H, W]``, ``ids_keep [B, N_vis]`` (None: all) -> tokens ``[B, 1+N_vis, D]``."""
        x = self.patch_embed(imgs)  # [B, N, D]
        x = x + self.pos_embed[:, 1:]  # [B, N, D]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, N_vis, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+N_vis, D]
        for blk in self.blocks:
            x = blk(x)  # [B, 1+N_vis, D]
        return self.norm(x)  # [B, 1+N_vis, D]

    def features(self, imgs: Tensor, pool: Literal["cls", "mean"] = "cls") -> Tensor:
        """All patches visible; ``cls``: the class token, ``mean``: mean of the patch tokens -> ``[B, D]``.

        Both read the tokens after the final norm (k-NN / linear probe features).
        """
        x = self.forward(imgs)  # [B, 1+N, D]
        if pool == "cls":
            return x[:, 0]  # [B, D]
        if pool == "mean":
            return x[:, 1:].mean(dim=1)  # [B, D]
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


# --------------------------------------------------------------------------- loading

_DROP_PREFIXES = ("decoder", "mask_token", "head.")


def _read_state_dict(src: str | Path | Mapping[str, Any], weights_only: bool) -> dict[str, Tensor]:
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            # published MAE checkpoints also pickle their argparse.Namespace ("args")
            with torch.serialization.safe_globals([argparse.Namespace]):
                src = torch.load(path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} holds objects that weights_only loading refuses; if you trust the file, "
                f"pass weights_only=False ({exc})"
            ) from exc
    if not isinstance(src, Mapping):
        raise TypeError(f"expected a state dict or {{'model': state_dict}}, got {type(src).__name__}")
    for key in ("model", "state_dict"):
        if key in src and isinstance(src[key], Mapping):
            src = src[key]
            break
    sd = {k: v for k, v in src.items() if isinstance(v, Tensor)}
    if not sd:
        raise ValueError("the checkpoint holds no tensors")
    if any(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("encoder.") for k in sd):  # a study.models.MaskedAutoencoder checkpoint
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    return sd


def load_pretrained_encoder(
    encoder: ViTEncoder,
    src: str | Path | Mapping[str, Any],
    *,
    weights_only: bool = True,
) -> list[str]:
    """Load encoder weights from a published MAE checkpoint, a timm ViT or our own run.

    ``src``: a path to a ``.pth`` or a mapping, either ``{"model": state_dict}``
    or a bare state dict (keys may carry ``module.`` or, for our
    ``MaskedAutoencoder``, ``encoder.`` prefixes: then only those keys are read, whatever modules an
    objective added). Decoder keys (``decoder*``), ``mask_token`` and ``head.*`` are dropped; every
    other key must match the encoder exactly (names and shapes), else a
    ``ValueError`` lists what is missing, unexpected or mis-shaped.
    Returns the dropped keys.
    """
    sd = _read_state_dict(src, weights_only)
    dropped = sorted(k for k in sd if k.startswith(_DROP_PREFIXES))
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}
    own = encoder.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs encoder {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches {mismatched}")
        raise ValueError("checkpoint does not fit the encoder: " + "; ".join(parts))
    encoder.load_state_dict(sd, strict=True)
    return dropped
