"""Export a pretrained encoder for use outside this package: timm or Hugging Face transformers.

Reads this project's checkpoints or a facebookresearch MAE ``.pth`` (its
architecture from ``--config`` / ``--set``, as for ``evaluate``) and writes a folder
with ``config.json`` and ``model.safetensors`` in timm's own layout
(``timm.create_model("local-dir:DIR", pretrained=True)``, features of ``--pool``,
default ``mean`` as for ``evaluate``,
with the package's normalisation and eval crop in ``pretrained_cfg``) or in the
layout of the Hub's ``google/vit-*`` checkpoints (``ViTModel.from_pretrained``;
``last_hidden_state`` is the package's ``encoder(x)``). The export is read back and
its features compared with the package's encoder (a difference above 1e-4 stops
with an error), so a silent mismatch cannot leave the package; encoders that do not
fit the plain ViT both libraries implement are refused with the keys that do not fit.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Sequence

import timm
import torch
from safetensors.torch import load_file, save
from torch import Tensor

from study.config import ConfigError
from study.data.datasets import IMAGENET_MEAN, IMAGENET_STD, build_eval_datasets
from study.evaluation.setup import EvaluationError, load_for_evaluation, resolve_checkpoint
from study.evaluation.features import POOLS, default_pool
from study.data.image_folders import eval_resize_size
from study.utils.io import atomic_write, atomic_write_text
from study.models.encoder import ViTEncoder, load_pretrained_encoder

__all__ = ["FORMATS", "ExportError", "load_encoder", "timm_files", "transformers_files", "export",
           "verify_export", "add_arguments", "run_from_args"]

FORMATS = ("timm", "transformers")

WEIGHTS = "model.safetensors"
TOLERANCE = 1e-4
# timm names of the standard ViT sizes, by (width, depth, heads)
_TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
               (1280, 32, 16): "huge"}


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or a bad export request."""


# --------------------------------------------------------------------------- reading


def load_encoder(checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()):
    """The checkpoint's encoder (eval mode) and its config: ``(ViTEncoder, Config)``."""
    try:
        cfg, state, _ = load_for_evaluation(checkpoint, config, overrides)
    except (EvaluationError, RuntimeError) as exc:  # RuntimeError: not a torch file
        raise ExportError(str(exc)) from None
    m = cfg.model
    encoder = ViTEncoder(m.img_size, m.patch_size, m.in_chans, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio)
    try:
        load_pretrained_encoder(encoder, state)
    except ValueError as exc:
        raise ExportError(
            f"cannot export {checkpoint}: its encoder is not the plain ViT (class token, absolute position "
            f"embeddings, pre-norm blocks with qkv bias, final norm) that timm's VisionTransformer and "
            f"transformers' ViTModel implement, or not the architecture the config describes: {exc}") from None
    return encoder.eval(), cfg


def pixel_normalisation(cfg) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-channel (mean, std) that the package's transforms apply, or None (synthetic images have no pixels)."""
    name = cfg.data.name
    if name in ("imagefolder", "imagenet100"):
        return IMAGENET_MEAN, IMAGENET_STD
    if name in ("mnist", "digits"):
        train, _ = build_eval_datasets(cfg)  # the bundled sets normalise by their own training pixels
        return train.mean, train.std
    return None


def eval_crop(cfg) -> dict:
    """timm's ``crop_pct`` / ``crop_mode`` that reproduce the package's eval transform for ``cfg.data``.

    Image folders resize the short side to :func:`eval_resize_size` and centre-crop; timm resizes to
    ``floor(img_size / crop_pct)``, so crop_pct is chosen to land on that size exactly (224 / 256 at
    224 px, but 32 / 37 at 32 px, not 0.875). The in-memory sets resize the whole image: a squash.
    """
    size = cfg.model.img_size
    if cfg.data.name not in ("imagefolder", "imagenet100"):
        return {"crop_pct": 1.0, "crop_mode": "squash"}
    resize = eval_resize_size(size)
    crop_pct = size / resize
    if math.floor(size / crop_pct) != resize:  # the division rounded below the integer
        crop_pct = size / (resize + 0.5)
    return {"crop_pct": crop_pct, "crop_mode": "center"}


def _mlp_hidden(encoder: ViTEncoder) -> int:
    return encoder.blocks[0].mlp.fc1.out_features


# --------------------------------------------------------------------------- timm


def timm_architecture(cfg) -> str:
    """A registered timm ViT name; the standard one when the sizes match, else a base that model_args reshape."""
    m = cfg.model
    size = _TIMM_SIZES.get((m.embed_dim, m.depth, m.num_heads))
    name = f"vit_{size}_patch{m.patch_size}_{m.img_size}"
    return name if size and timm.is_model(name) else "vit_tiny_patch16_224"


def timm_files(encoder: ViTEncoder, cfg, pool: str = "mean") -> tuple[dict, dict[str, Tensor]]:
    """``(config.json dict, state dict)`` of the timm export; timm's key names are the encoder's own."""
    m = cfg.model
    model_args = {
        "img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans, "embed_dim": m.embed_dim,
        "depth": m.depth, "num_heads": m.num_heads, "mlp_ratio": m.mlp_ratio, "qkv_bias": True,
        "class_token": True, "global_pool": "token" if pool == "cls" else "avg",
        # timm would otherwise norm after pooling for "avg"; the package norms every token first
        "fc_norm": False, "num_classes": 0,
    }
    pretrained_cfg = {
        "num_classes": 0, "input_size": [m.in_chans, m.img_size, m.img_size], "interpolation": "bicubic",
        **eval_crop(cfg), "first_conv": "patch_embed.proj", "classifier": "head",
    }
    # synthetic images are made in model space: no normalisation (else timm would fill in ImageNet's)
    mean, std = pixel_normalisation(cfg) or ((0.0,) * m.in_chans, (1.0,) * m.in_chans)
    pretrained_cfg["mean"], pretrained_cfg["std"] = list(mean), list(std)
    config = {"architecture": timm_architecture(cfg), "num_classes": 0, "num_features": m.embed_dim,
              "global_pool": model_args["global_pool"], "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    return config, {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}


def load_timm(folder: str | Path):
    """The exported timm model, built from ``config.json`` and loaded strictly (eval mode)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(load_file(folder / WEIGHTS), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- transformers


def transformers_files(encoder: ViTEncoder, cfg) -> tuple[dict, dict[str, Tensor], dict | None]:
    """``(config.json, state dict, preprocessor_config.json or None)`` in the Hub's ViT key names."""
    m = cfg.model
    d = m.embed_dim
    sd = encoder.state_dict()
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
        # the pooler is the identity on the class token: pooler_output = the package's cls features
        "pooler.dense.weight": torch.eye(d),
        "pooler.dense.bias": torch.zeros(d),
    }
    for i in range(m.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        # timm's fused qkv rows are [q; k; v], each laid out head by head like transformers' query/key/value
        for name, w, b in zip(("query", "key", "value"), sd[src + "attn.qkv.weight"].chunk(3),
                              sd[src + "attn.qkv.bias"].chunk(3)):
            out[f"{dst}attention.attention.{name}.weight"] = w
            out[f"{dst}attention.attention.{name}.bias"] = b
        for theirs, ours in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2")):
            out[f"{dst}{theirs}.weight"] = sd[f"{src}{ours}.weight"]
            out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
    config = {
        "architectures": ["ViTModel"], "model_type": "vit", "hidden_size": d, "num_hidden_layers": m.depth,
        "num_attention_heads": m.num_heads, "intermediate_size": _mlp_hidden(encoder), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": 1e-6, "image_size": m.img_size, "patch_size": m.patch_size,
        "num_channels": m.in_chans, "qkv_bias": True, "encoder_stride": m.patch_size,
        "pooler_output_size": d, "pooler_act": "linear",
    }
    norm = pixel_normalisation(cfg)
    preprocessor = None
    if norm is not None:
        preprocessor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                        "size": {"height": m.img_size, "width": m.img_size}, "resample": 3,  # bicubic
                        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                        "image_mean": list(norm[0]), "image_std": list(norm[1])}
    return config, {k: v.detach().clone().contiguous() for k, v in out.items()}, preprocessor


def load_transformers(folder: str | Path):
    """``ViTModel.from_pretrained(folder)`` (eval mode); refuses a load that leaves any weight unset or unused."""
    from transformers import ViTModel

    model, info = ViTModel.from_pretrained(str(folder), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ExportError(f"transformers did not load {folder} exactly: {bad}")
    return model.eval()


# --------------------------------------------------------------------------- writing and checking


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _write_weights(path: Path, tensors: dict[str, Tensor]) -> None:
    # transformers refuses safetensors files without the "pt" format tag; bytes written into the
    # temporary keep its permissions (save_file would recreate it owner-only)
    data = save(tensors, metadata={"format": "pt"})
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _exported_features(fmt: str, folder: Path, imgs: Tensor) -> dict[str, Tensor]:
    if fmt == "timm":
        model = load_timm(folder)
        tokens = model.forward_features(imgs)  # [B, 1+N, D], after the final norm
        pooled = model(imgs)  # [B, D], the pool the export was made for
        out = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(dim=1)}
        out["model(x)"] = pooled
        return out
    model = load_transformers(folder)
    res = model(pixel_values=imgs)
    tokens = res.last_hidden_state  # [B, 1+N, D]
    return {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(dim=1), "pooler_output": res.pooler_output}


@torch.no_grad()
def verify_export(encoder: ViTEncoder, fmt: str, folder: str | Path, pool: str = "mean", batch: int = 2,
                  seed: int = 0) -> dict[str, float]:
    """Max |exported - package| feature difference on a random batch, per pooling (read back from disk)."""
    gen = torch.Generator().manual_seed(seed)
    pe = encoder.patch_embed
    imgs = torch.randn(batch, pe.proj.in_channels, *pe.img_size, generator=gen)
    ours = {p: encoder.features(imgs, p) for p in POOLS}
    theirs = _exported_features(fmt, Path(folder), imgs)
    ref = {"cls": ours["cls"], "mean": ours["mean"], "model(x)": ours[pool], "pooler_output": ours["cls"]}
    return {name: (value - ref[name]).abs().max().item() for name, value in theirs.items()}


def export(checkpoint: str | Path, fmt: str, out: str | Path, *, config: str | Path | None = None,
           overrides: Sequence[str] = (), pool: str | None = None, verify: bool = True,
           overwrite: bool = False) -> dict[str, float]:
    """Write the export folder ``out``; returns the read-back feature differences ({} without ``verify``).

    An ``out`` that holds files is refused unless ``overwrite`` (and it holds an export: nothing else
    is ever replaced)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if pool is not None and pool not in POOLS:
        raise ExportError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    out = Path(out)
    _check_out(out, overwrite)
    checkpoint = resolve_checkpoint(checkpoint)  # a run folder stands for its checkpoint.pt
    if fmt == "transformers" and verify:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ExportError("checking a transformers export needs transformers: pip install -e '.[export]' "
                              "(or pass --no-verify)") from None
    encoder, cfg = load_encoder(checkpoint, config, overrides)
    pool = pool or default_pool(cfg.data.name)
    if fmt == "timm":
        meta, tensors = timm_files(encoder, cfg, pool)
        extra = None
    else:
        meta, tensors, extra = transformers_files(encoder, cfg)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / "preprocessor_config.json").unlink(missing_ok=True)
        if extra is not None:
            _write_json(out / "preprocessor_config.json", extra)
        _write_weights(out / WEIGHTS, tensors)
        _write_json(out / "config.json", meta)
    except BaseException:
        if made:  # a failed write (a full disk) leaves no half export behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not verify:
        return {}
    diffs = verify_export(encoder, fmt, out, pool)
    worst = max(diffs.values())
    if not worst <= TOLERANCE:  # a NaN difference fails too
        raise ExportError(f"the export in {out} does not reproduce the encoder's features: max difference "
                          f"{worst:.2e} > {TOLERANCE:g} ({diffs})")
    return diffs


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder for the export")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not (out / "config.json").is_file():
        raise ExportError(f"--out {out} holds files and no export (no config.json); choose a new or empty folder")
    if not overwrite:
        raise ExportError(f"--out {out} holds an export already; pass --overwrite to replace it, or choose a "
                          "new folder")


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its checkpoint.pt), this project's checkpoint.pt / snapshots/epoch_*.pt, "
                             "or a facebookresearch MAE .pth")
    parser.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors)")
    # the same default as evaluate's --pool, so an export gives the features the reported numbers were measured on
    parser.add_argument("--pool", choices=POOLS, default=None,
                        help="timm: what model(x) returns, the class token or the mean of the patch tokens (default: "
                             "evaluate's, cls on ImageNet-100 and mean elsewhere); transformers gives both from "
                             "last_hidden_state")
    parser.add_argument("--config", default=None,
                        help="YAML config; only for checkpoints without one (facebookresearch format)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.depth=12 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace the export already in --out")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reading the export back and comparing its features with the encoder's")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        diffs = export(args.checkpoint, args.fmt, args.out, config=args.config, overrides=args.overrides,
                       pool=args.pool, verify=not args.no_verify, overwrite=args.overwrite)
    except (ExportError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.fmt} export of {args.checkpoint} to {args.out}")
    if diffs:
        print("read back; max |feature difference| vs the package's encoder: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    if args.fmt == "timm":
        print(f'load: timm.create_model("local-dir:{args.out}", pretrained=True)')
    else:
        print(f'load: transformers.ViTModel.from_pretrained("{args.out}")')
    return 0
