"""Typed run configuration: dataclasses loaded from YAML plus ``key.sub=value`` overrides.

Every value is checked when the config is loaded; an error names the field
(``mask.ratio must be in (0, 1), got 1.5``). The resolved config is saved
beside each run (``config.yaml``) and inside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from study.utils import registry
from study.utils.errors import UserError
from study.utils.io import atomic_write_text
from study.utils.yaml_keys import load_yaml

__all__ = [
    "num_masked", "Config", "ConfigError", "ModelConfig", "NoiseConfig", "CIMLEConfig", "MVAEConfig", "MaskConfig",
    "SyntheticConfig", "DataConfig", "OptimConfig", "LoggingConfig", "MonitorConfig", "load_config",
    "config_from_dict", "config_to_dict", "save_config", "with_overrides",
]


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the field."""


@dataclass
class ModelConfig:
    img_size: int = 28
    patch_size: int = 7
    in_chans: int = 1
    embed_dim: int = 64
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    decoder_dim: int = 48
    decoder_depth: int = 1
    decoder_heads: int = 4
    norm_pix_loss: bool = False
    # position embeddings of encoder and decoder: fixed 2-D sin-cos (MAE) or learned
    # (ViT; initialised N(0, 0.02^2)); on the 16-token MNIST config learned ones probe better
    pos_embed: Literal["sincos", "learned"] = "sincos"


@dataclass
class NoiseConfig:
    """How noise z enters the decoder (cIMLE samples, Masked VAE latents)."""

    dim: int = 8
    scope: Literal["image", "token"] = "image"
    # decoder block before which z is injected: 0 = decoder input; the blocks
    # before it run once and are shared by all k samples. "head": after the
    # whole decoder, z enters a token-wise MLP head with the token's state
    # (cIMLE's per-token selection is exact there; the cheapest place for k).
    block: int | Literal["head"] = 0
    injection: Literal["add", "adaln"] = "add"


@dataclass
class CIMLEConfig:
    k: int = 8
    # samples decoded per call in selection (None: all k; "auto": what fits in half the free CUDA memory)
    chunk: int | Literal["auto"] | None = None
    # how the samples are decoded: "vmap" (torch.func.vmap), "batched" (folded into the batch: fused
    # attention and autocast apply), "auto" (batched on CUDA and in a compiled step, vmap on CPU)
    decode: Literal["auto", "vmap", "batched"] = "auto"
    # "image": the nearest of k samples per image; "token": per masked patch (factorised cIMLE,
    # needs per-token noise that enters after the decoder's last attention)
    select: Literal["image", "token"] = "image"


@dataclass
class MVAEConfig:
    """The Masked VAE as published (section 4 of its paper): the KL is
    averaged per latent feature and weighted by beta = 30, and the variational
    encoder learns at 1/100 of the main learning rate."""

    beta: float = 30.0
    lr_factor: float = 0.01  # learning-rate multiplier for the variational encoder
    depth: int | None = None  # transformer blocks in the variational encoder (None: as deep as the encoder)


@dataclass
class MaskConfig:
    kind: Literal["random", "block", "noise"] = "random"
    ratio: float = 0.75
    # filtered-noise masks (ColorMAE): which filter shapes the white noise
    filter: Literal["red", "blue", "green", "white"] = "green"
    # block-wise masks (BEiT): smallest block, in patches
    block_min_patches: int = 4


@dataclass
class SignFlipConfig:
    # each masked target patch (scope "patch") or all of an image's (scope "image") multiplied by -1 with
    # probability p: the encoder still sees the real image, E[y | x] = (1 - 2p) y, and at p = 0.5 the
    # conditional mean of the masked content is 0 while its two modes, +y and -y, still trace the image
    p: float = 0.0
    scope: Literal["patch", "image"] = "patch"


@dataclass
class SyntheticConfig:
    """The same-mean synthetic images (``data.name: synthetic``; :mod:`study.data.synthetic_images`): every patch shows
    its class axis with a random sign under a distractor shared by the image."""

    classes: int = 10
    per_class: int = 200
    mean_shift: float = 0.0  # 0: classes differ only in their modes; 1: also in their mean
    noise_std: float = 0.1  # pixel noise on every patch
    cue: float = 2.0  # norm of the sign-random class cue in a patch
    distractor: float = 1.0  # std of the image-shared distractor (hides the class from a random encoder)


@dataclass
class DataConfig:
    name: Literal["mnist", "digits", "synthetic", "imagefolder", "imagenet100"] = "mnist"
    root: str | None = None  # folder for imagefolder / imagenet100
    # imagefolder only: "folders" labels images by their class folder; "none" reads every image under data.root
    # at any depth, for pretraining on unlabelled images (label-based evaluation refuses it)
    labels: Literal["folders", "none"] = "folders"
    augment: bool = True  # random resized crop + flip (MAE)
    on_bad_image: Literal["error", "skip"] = "error"
    num_workers: int = 0
    # a pack of the training split (python -m study pack): pretraining crops it on the device instead of
    # decoding JPEGs; evaluation still reads data.root
    packed: str | None = None
    subset: int | None = None  # train on a fixed random N of the training images (smoke runs, rehearsals)
    val_fraction: float = 0.2  # held-out split for bundled / synthetic data
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    sign_flip: SignFlipConfig = field(default_factory=SignFlipConfig)  # the pretraining targets only


@dataclass
class OptimConfig:
    batch_size: int = 256
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_epochs: float = 5.0
    accum_steps: int = 1
    # the batch of one optimiser step over all processes (MAE: 4096); when set, accum_steps is derived at the
    # start of a run from the processes at hand: effective_batch / (batch_size x processes)
    effective_batch: int | None = None
    clip_grad: float | None = None
    max_loss_growth: float | None = 100.0  # stop when an epoch's loss exceeds this x the first epoch's (null: never)


@dataclass
class LoggingConfig:
    # also write metrics.jsonl's scalars to <run>/tensorboard/ (needs the tensorboard extra)
    tensorboard: bool = False


@dataclass
class MonitorConfig:
    # k-NN on fixed labelled subsets every this many epochs and after the last (0: off); rank 0 only
    knn_every: int = 0
    train_images: int = 10000  # the k-NN's reference set, drawn once from the training split
    val_images: int = 2000  # its queries, from the validation split (both kept decoded in memory on rank 0)
    k: int = 20
    pool: Literal["cls", "mean"] | None = None  # None: the evaluation's default for the data set


@dataclass
class Config:
    objective: str = "ls"  # a name registered in study.methods: "ls", "cimle", "mvae"
    epochs: int = 10
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    # after these (1-based) epochs also keep a model-only copy in snapshots/ (efficiency curves)
    snapshot_epochs: list[int] = field(default_factory=list)
    # write checkpoint.pt every this many epochs and after the last; a killed run redoes at most this many
    checkpoint_every: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    cimle: CIMLEConfig = field(default_factory=CIMLEConfig)
    mvae: MVAEConfig = field(default_factory=MVAEConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches per column and per row of a (square) image."""
        side = self.model.img_size // self.model.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        gh, gw = self.patch_grid
        return gh * gw


def num_masked(ratio: float, num_patches: int) -> int:
    """Patches masked in every image at ``mask.ratio``: ``floor(ratio * N + 0.5)``, halves up (not to even)."""
    return int(math.floor(ratio * num_patches + 0.5))


# --------------------------------------------------------------------------- checks


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name} {msg}")


def validate(cfg: Config) -> Config:
    """Cross-field and range checks; raises ConfigError naming the field."""
    m = cfg.model
    _check(cfg.objective in registry.names(), "objective", f"must be one of {registry.names()}, got {cfg.objective!r}")
    _check(cfg.epochs >= 1, "epochs", f"must be >= 1, got {cfg.epochs}")
    _check(0 <= cfg.seed <= 2**32 - 1, "seed", f"must be in [0, {2**32 - 1}] (numpy's seed range), got {cfg.seed}")
    _check(cfg.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1 (epochs), got {cfg.checkpoint_every}")
    mon = cfg.monitor
    _check(mon.knn_every >= 0, "monitor.knn_every", f"must be >= 0 (0: off), got {mon.knn_every}")
    for name in ("train_images", "val_images", "k"):
        _check(getattr(mon, name) >= 1, f"monitor.{name}", f"must be >= 1, got {getattr(mon, name)}")
    _check(mon.knn_every == 0 or cfg.data.labels == "folders", "monitor.knn_every",
           "needs labelled data (data.labels=folders); set monitor.knn_every=0")
    bad = [e for e in cfg.snapshot_epochs if not 1 <= e <= cfg.epochs]
    _check(not bad, "snapshot_epochs", f"must lie in [1, epochs={cfg.epochs}], got {bad}")
    for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                 "decoder_dim", "decoder_depth", "decoder_heads"):
        value = getattr(m, name)
        _check(value >= 1, f"model.{name}", f"must be >= 1, got {value}")
    _check(m.img_size % m.patch_size == 0, "model.img_size",
           f"({m.img_size}) must be divisible by model.patch_size ({m.patch_size})")
    _check(m.embed_dim % m.num_heads == 0, "model.embed_dim",
           f"({m.embed_dim}) must be divisible by model.num_heads ({m.num_heads})")
    _check(m.decoder_dim % m.decoder_heads == 0, "model.decoder_dim",
           f"({m.decoder_dim}) must be divisible by model.decoder_heads ({m.decoder_heads})")
    _check(0.0 <= m.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {m.drop_path}")
    _check(m.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0, got {m.mlp_ratio}")

    _check(cfg.noise.dim >= 1, "noise.dim", f"must be >= 1, got {cfg.noise.dim}")
    _check(cfg.noise.block == "head" or 0 <= cfg.noise.block <= m.decoder_depth, "noise.block",
           f"must be 'head' or in [0, model.decoder_depth={m.decoder_depth}], got {cfg.noise.block}")
    if cfg.cimle.select == "token":
        # per-token selection is exact only if a token's output depends on its own noise alone:
        # noise per token, entering after the last attention (the head, or right before decoder_norm)
        _check(cfg.noise.scope == "token", "cimle.select",
               f"'token' needs noise.scope 'token' (one noise vector per masked patch), got {cfg.noise.scope!r}")
        _check(cfg.noise.block in ("head", m.decoder_depth), "cimle.select",
               f"'token' needs noise.block 'head' or {m.decoder_depth} (after the decoder's last attention, "
               f"where selection is exact), got {cfg.noise.block!r}")
    _check(cfg.cimle.k >= 1, "cimle.k", f"must be >= 1, got {cfg.cimle.k}")
    _check(cfg.cimle.chunk in (None, "auto") or cfg.cimle.chunk >= 1, "cimle.chunk",
           f"must be null, 'auto' or >= 1, got {cfg.cimle.chunk}")
    _check(cfg.mvae.beta >= 0, "mvae.beta", f"must be >= 0, got {cfg.mvae.beta}")
    _check(cfg.mvae.lr_factor > 0, "mvae.lr_factor", f"must be > 0, got {cfg.mvae.lr_factor}")
    _check(cfg.mvae.depth is None or cfg.mvae.depth >= 1, "mvae.depth",
           f"must be null (as deep as the encoder) or >= 1, got {cfg.mvae.depth}")

    _check(0.0 < cfg.mask.ratio < 1.0, "mask.ratio", f"must be in (0, 1), got {cfg.mask.ratio}")
    n = cfg.num_patches
    masked = num_masked(cfg.mask.ratio, n)
    _check(1 <= masked <= n - 1, "mask.ratio",
           f"({cfg.mask.ratio}) masks {masked} of {n} patches; at least one must be masked and one visible")
    _check(cfg.mask.block_min_patches >= 1, "mask.block_min_patches",
           f"must be >= 1, got {cfg.mask.block_min_patches}")
    # BEiT draws each block's area from [block_min_patches, patches still to mask]: above num_masked no block
    # is ever within range and the masks degrade into the random top-up
    gh, gw = cfg.patch_grid
    _check(cfg.mask.kind != "block" or cfg.mask.block_min_patches <= masked, "mask.block_min_patches",
           f"({cfg.mask.block_min_patches}) is more than the {masked} patches that mask.ratio={cfg.mask.ratio:g} masks "
           f"on the {gh}x{gw} patch grid, so no block fits and the masks would be random; set "
           f"mask.block_min_patches to at most {masked}")

    _validate_data(cfg.data)
    _validate_optim(cfg.optim)
    w = cfg.optim.warmup_epochs
    # a quick run (--set epochs=5) of a long recipe would otherwise never leave its warm-up, without a word
    _check(w <= cfg.epochs, "optim.warmup_epochs",
           f"({w:g}) is longer than the run (epochs={cfg.epochs}): the learning rate would never reach its peak; "
           f"set optim.warmup_epochs to at most {cfg.epochs} (MAE's recipe warms up for 5% of the run)")
    return cfg


def _validate_data(d: DataConfig) -> None:
    _check(d.name not in ("imagefolder", "imagenet100") or bool(d.root), "data.root",
           f"is required for data.name={d.name!r}: the folder that holds the images")
    _check(d.labels == "folders" or d.name == "imagefolder", "data.labels=none",
           f"(a folder of unlabelled images) needs data.name=imagefolder, got data.name={d.name!r}")
    _check(d.packed is None or d.name in ("imagefolder", "imagenet100"), "data.packed",
           f"is a pack of an image folder; data.name={d.name!r} has none (set data.packed=null)")
    _check(d.packed is None or d.augment, "data.packed",
           "holds the images for augmented pretraining; with data.augment=false set data.packed=null")
    _check(d.subset is None or (d.subset >= 1 and d.name in ("imagefolder", "imagenet100")), "data.subset",
           f"is a number >= 1 of an image folder's training images (or null), got {d.subset} for "
           f"data.name={d.name!r}")
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _check(0.0 <= d.sign_flip.p <= 0.5, "data.sign_flip.p", f"must be in [0, 0.5], got {d.sign_flip.p}")
    s = d.synthetic
    _check(s.classes >= 2, "data.synthetic.classes", f"must be >= 2, got {s.classes}")
    _check(s.per_class >= 1, "data.synthetic.per_class", f"must be >= 1, got {s.per_class}")
    _check(0.0 <= s.mean_shift <= 1.0, "data.synthetic.mean_shift", f"must be in [0, 1], got {s.mean_shift}")
    _check(s.noise_std >= 0, "data.synthetic.noise_std", f"must be >= 0, got {s.noise_std}")
    _check(s.cue > 0, "data.synthetic.cue", f"must be > 0, got {s.cue}")
    _check(s.distractor >= 0, "data.synthetic.distractor", f"must be >= 0, got {s.distractor}")


def _validate_optim(o: OptimConfig) -> None:
    _check(o.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {o.batch_size}")
    _check(o.blr > 0, "optim.blr", f"must be > 0, got {o.blr}")
    _check(o.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {o.min_lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", f"must be in [0, 1), got {o.beta1}, {o.beta2}")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    _check(o.accum_steps >= 1, "optim.accum_steps", f"must be >= 1, got {o.accum_steps}")
    _check(o.effective_batch is None or (o.effective_batch >= 1 and o.effective_batch % o.batch_size == 0),
           "optim.effective_batch", f"must be null or a multiple of optim.batch_size ({o.batch_size}), "
           f"got {o.effective_batch}")
    _check(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", f"must be null or > 0, got {o.clip_grad}")
    _check(o.max_loss_growth is None or o.max_loss_growth > 1, "optim.max_loss_growth",
           f"must be null or > 1, got {o.max_loss_growth}")


# --------------------------------------------------------------------------- conversion


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML value to the annotated type or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return _build(tp, value, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{name} must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc).removeprefix(f"{name} must be ").rsplit(", got", 1)[0])
        raise ConfigError(f"{name} must be {' or '.join(errors)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 4e-3 (no dot) as a string; accept what Python reads as a finite number
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):  # inf or nan passes every range check below and poisons training
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    return validate(_build(Config, data or {}))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or defaults when ``path`` is None) and apply ``key.sub=value`` overrides.

    Override values are parsed as YAML, so ``cimle.k=4``, ``optim.clip_grad=null`` and
    ``mask.kind=block`` all mean what they say.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml(path)
        if loaded is None:  # most likely the wrong file, or one not yet written: not a request for the defaults
            raise ConfigError(f"{path} is empty (or holds only comments); write the settings in it, or leave out "
                              "--config for the defaults")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        data = loaded
    return config_from_dict(apply_overrides(data, overrides))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: str | Path) -> Any:
    """The YAML of a file; a syntax error or a duplicated key becomes a ConfigError naming the file and line."""
    path = Path(path)
    try:
        return load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (YAML) file") from None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of the raw config mapping ``data`` with ``key.sub=value`` items applied (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(exc)})") from None
        _set_dotted(data, key.strip(), value)
    return data


def with_overrides(cfg: Config, *items: str) -> Config:
    """``cfg`` with ``key.sub=value`` items applied and checked as ``--set`` does (``"objective=ls"``)."""
    return config_from_dict(apply_overrides(config_to_dict(cfg), items))


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
