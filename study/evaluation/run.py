"""The ``evaluate`` command: probe a checkpoint with k-NN, linear probe and finetuning.

    python -m study evaluate --checkpoint runs/x/checkpoint.pt --protocols knn,linear,finetune \
        [--results runs/results.csv] [--pool cls|mean] [--preset auto|cpu|gpu] [--figures runs/figures]

Two more protocols look at the decoder's completions (this project's
checkpoints only, full or weights-only ``{model, config, epoch,
train_seconds}``): ``samples`` (:mod:`study.evaluation.samples`: a figure
``<figures>/samples_<objective>.{png,pdf}`` and ``sample_diversity``) and
``completion`` (:mod:`study.evaluation.context_completion`: the
Context-Completion analog on synthetic data, ``cc_precision``, ``cc_recall``,
``cc_null_rate``, ``cc_empty_rate``, ``oracle_accuracy``). Their
``encoder = "random"`` rows use the whole seeded random-init model.

Checkpoint formats (detected by keys):

* this project's (``checkpoint.pt``, ``snapshots/epoch_*.pt``): holds
  ``"config"``; ``--set`` overrides are applied on top of it (e.g. a new
  ``data.root`` on another machine); ``--config`` is refused.
* facebookresearch MAE (``{"model": state_dict}``, no config): the
  architecture and data come from ``--config`` / ``--set``, one of which is
  required; the encoder weights load through ``study.models.load_pretrained_encoder``.

Each protocol runs on the pretrained encoder and on the randomly initialised
encoder of the same architecture (``torch``/``numpy``/``random`` seeded with
``seed`` right before ``build_model``, as the pretraining loop does), so every
number has its baseline; rows carry ``encoder = "pretrained"`` or ``"random"``.
Frozen features are extracted once per encoder, split and pool and shared by
k-NN and the linear probe (``--feature-cache DIR`` also keeps them on disk).

Rows (one metric value each) are appended to the tidy results table with
:func:`study.results.append_rows`. The table is checked before any protocol
runs (a folder, an unwritable path or a file that is not a results table is
refused); if the write still fails at the end, the rows go to a side file
beside it (or in the temporary folder) that the error names. The defaults
(``runs/results.csv``, ``runs/figures``) stay out of the committed
``results/`` and ``figures/``. Metrics: ``knn_top1``, ``linear_top1``,
``linear_train_top1``, ``finetune_top1`` (fractions in [0, 1]) and
``<protocol>_seconds`` (k-NN and linear include the shared feature
extraction). Every row carries the run's parameters (objective,
mask_kind, mask_ratio, k = cimle.k, noise_dim, noise_block, ..., seed, epochs =
epochs trained, dataset, checkpoint) and the evaluation's (protocol, pool,
encoder, preset and protocol settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import random
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from study.errors import UserError, one_line
from study.evaluation.features import POOLS, FeatureCache, extract_features, feature_key
from study.evaluation.finetune import FinetuneSettings, build_finetune_datasets, finetune, finetune_settings
from study.evaluation.knn import knn_accuracy
from study.evaluation.linear_probe import (LinearProbeSettings, cpu_threads, linear_probe_settings,
                                           train_linear_probe)

__all__ = ["PROTOCOLS", "DEFAULT_RESULTS", "evaluate", "parse_protocols", "load_for_evaluation",
           "add_arguments", "run_from_args"]

PROTOCOLS = ("knn", "linear", "finetune", "samples", "completion")
DEFAULT_FIGURES = "runs/figures"
DEFAULT_RESULTS = "runs/results.csv"
ENCODERS = ("pretrained", "random")


class EvaluationError(UserError, ValueError):
    """A bad evaluate request (unknown protocol, missing config for a foreign checkpoint...)."""


def parse_protocols(protocols: str | Iterable[str]) -> list[str]:
    """``"knn,linear"`` or ``["knn", "linear"]`` -> validated list (order kept, duplicates dropped)."""
    items = protocols.split(",") if isinstance(protocols, str) else list(protocols)
    out: list[str] = []
    for item in (p.strip().lower() for p in items):
        if not item:
            continue
        if item not in PROTOCOLS:
            raise EvaluationError(f"unknown protocol {item!r}; valid protocols: {', '.join(PROTOCOLS)}")
        if item not in out:
            out.append(item)
    if not out:
        raise EvaluationError(f"no protocol given; valid protocols: {', '.join(PROTOCOLS)}")
    return out


# --------------------------------------------------------------------------- loading


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_for_evaluation(checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()):
    """Read a checkpoint of either format; return ``(cfg, state, format)``.

    ``format`` is ``"study"`` (has a config) or ``"facebookresearch"`` (only ``"model"``).
    """
    from study.config import apply_overrides, config_from_dict, load_config
    from study.train import load_checkpoint

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise EvaluationError(f"{path} is neither this project's checkpoint (keys model, config, epoch) nor a "
                              f"facebookresearch MAE one (key model); it has {keys}")
    if "config" in state:
        if config is not None:
            raise EvaluationError(f"{path} carries its own config; drop --config (use --set to change fields, "
                                  "e.g. --set data.root=...)")
        cfg = config_from_dict(apply_overrides(state["config"], overrides))
        return cfg, state, "study"
    if config is None and not overrides:
        raise EvaluationError(f"{path} has no config (facebookresearch format): pass --config (e.g. "
                              "experiments/configs/in1k-vit-b.yaml) and/or --set to describe its architecture "
                              "and the evaluation data")
    return load_config(config, list(overrides)), state, "facebookresearch"


def _build_encoders(cfg, state: dict, fmt: str, which: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The encoders to evaluate: "pretrained" (checkpoint weights), "random" (seeded init)."""
    from study.models import build_model

    out = {}
    if "pretrained" in which:
        _seed_all(cfg.seed)
        model = build_model(cfg)
        try:
            if fmt == "study":
                model.load_state_dict(state["model"])
            else:
                from study.models import load_pretrained_encoder

                load_pretrained_encoder(model.encoder, state)
        except (RuntimeError, ValueError) as exc:  # names or shapes differ: another architecture
            from study.train import CheckpointError

            detail = one_line(exc)
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            fix = ("drop the --set model.* overrides: the checkpoint's own config describes it" if fmt == "study"
                   else "pass the --config / --set model.* of the architecture it was trained with")
            raise CheckpointError(f"the checkpoint's weights do not fit the model of this config ({detail}); "
                                  f"{fix}") from exc
        out["pretrained"] = model.encoder
    if "random" in which:
        _seed_all(cfg.seed)
        out["random"] = build_model(cfg).encoder
    return out


def run_params(cfg, state: dict, fmt: str, checkpoint: str | Path) -> dict:
    """The parameters that produced a checkpoint, flattened into result columns."""
    epoch = state.get("epoch")
    return {
        "objective": cfg.objective,
        "mask_kind": cfg.mask.kind,
        "mask_ratio": cfg.mask.ratio,
        "mask_filter": cfg.mask.filter if cfg.mask.kind == "noise" else None,
        "k": cfg.cimle.k,
        "noise_dim": cfg.noise.dim,
        "noise_scope": cfg.noise.scope,
        "noise_block": cfg.noise.block,
        "noise_injection": cfg.noise.injection,
        "cimle_select": cfg.cimle.select,
        "mvae_beta": cfg.mvae.beta,
        "seed": cfg.seed,
        "epochs": int(epoch) + 1 if epoch is not None else (cfg.epochs if fmt == "study" else None),
        "config_epochs": cfg.epochs,
        "train_seconds": state.get("train_seconds"),
        "dataset": cfg.data.name,
        "synthetic_mean_shift": cfg.data.synthetic_mean_shift if cfg.data.name == "synthetic" else None,
        "synthetic_cue": cfg.data.synthetic_cue if cfg.data.name == "synthetic" else None,
        "synthetic_distractor": cfg.data.synthetic_distractor if cfg.data.name == "synthetic" else None,
        "img_size": cfg.model.img_size,
        "patch_size": cfg.model.patch_size,
        "embed_dim": cfg.model.embed_dim,
        "depth": cfg.model.depth,
        "decoder_dim": cfg.model.decoder_dim,
        "decoder_depth": cfg.model.decoder_depth,
        "checkpoint": str(checkpoint),
        "checkpoint_format": fmt,
    }


def _resolve_device(device: str | None, cfg) -> torch.device:
    kind = device or cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available; pass --device cpu")
    return torch.device(kind)


def _num_classes(dataset, labels: torch.Tensor | None = None) -> int:
    n = getattr(dataset, "num_classes", None)
    if n is None and labels is not None:
        n = int(labels.max()) + 1
    if n is None:
        raise EvaluationError("the dataset does not say how many classes it has (num_classes)")
    return int(n)


# --------------------------------------------------------------------------- evaluate


def evaluate(checkpoint: str | Path, protocols: str | Iterable[str] = ("knn", "linear"),
             results: str | Path | None = DEFAULT_RESULTS, *, config: str | Path | None = None,
             overrides: Sequence[str] = (), pool: str = "cls", knn_k: int = 20, knn_temperature: float = 0.07,
             preset: str = "auto", linear: LinearProbeSettings | None = None,
             finetune_cfg: FinetuneSettings | None = None, random_baseline: bool = True,
             device: str | None = None, batch_size: int | None = None, feature_cache: str | Path | None = None,
             cache: FeatureCache | None = None, finetune_max_steps: int | None = None, threads: int | None = None,
             progress: bool = True, verbose: bool = True, figures: str | Path | None = DEFAULT_FIGURES) -> list[dict]:
    """Evaluate ``checkpoint`` with ``protocols``; append and return the result rows.

    ``results=None`` returns the rows without writing. ``preset`` picks the
    linear-probe and finetune settings ("cpu", "gpu", or "auto": gpu on CUDA);
    ``linear`` / ``finetune_cfg`` replace them outright. ``random_baseline=False``
    skips the random-init rows (they are on by default; use only to save a
    100-epoch GPU finetune of a baseline already in the table). ``threads``
    sets torch's CPU threads for the call (the linear probe always trains on
    one CPU thread). ``finetune_max_steps`` cuts finetuning short (smoke tests).
    ``figures``: folder for the ``samples`` figure (None: no figure).
    """
    with cpu_threads(threads):
        return _evaluate(checkpoint, protocols, results, config=config, overrides=overrides, pool=pool,
                         knn_k=knn_k, knn_temperature=knn_temperature, preset=preset, linear=linear,
                         finetune_cfg=finetune_cfg,
                         random_baseline=random_baseline, device=device, batch_size=batch_size,
                         feature_cache=feature_cache, cache=cache, finetune_max_steps=finetune_max_steps,
                         progress=progress, verbose=verbose, figures=figures)


def _evaluate(checkpoint, protocols, results, *, config, overrides, pool, knn_k, knn_temperature, preset, linear,
              finetune_cfg, random_baseline, device, batch_size, feature_cache, cache, finetune_max_steps,
              progress, verbose, figures=DEFAULT_FIGURES) -> list[dict]:
    protos = parse_protocols(protocols)
    if pool not in POOLS:
        raise EvaluationError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    if results is not None:
        from study.results import check_table

        check_table(results)  # now, not after every protocol has run
    if "samples" in protos and figures is not None:
        from study.io import writable_folder

        try:
            writable_folder(figures)
        except OSError as exc:
            raise EvaluationError(f"cannot write the samples figure to --figures {figures}: "
                                  f"{exc.strerror or exc}") from None
    cfg, state, fmt = load_for_evaluation(checkpoint, config, overrides)
    decoder_protos = [p for p in protos if p in ("samples", "completion")]
    if decoder_protos and fmt != "study":
        raise EvaluationError(f"{', '.join(decoder_protos)} need the decoder: only this project's checkpoints (with a "
                              "config) are supported, not the encoder-only facebookresearch format")
    if "completion" in protos:
        from study.evaluation.context_completion import check_synthetic

        check_synthetic(cfg)
    dev = _resolve_device(device, cfg)
    if preset == "auto":
        preset = "gpu" if dev.type == "cuda" else "cpu"
    lin = linear or linear_probe_settings(preset)
    ft = finetune_cfg or finetune_settings(preset)
    bs = batch_size or (256 if dev.type == "cpu" else 512)
    precision = cfg.precision
    which = ENCODERS if random_baseline else ("pretrained",)
    cache = cache or FeatureCache(feature_cache)
    cfg_dict = dataclasses.asdict(cfg)

    from study.data import build_eval_datasets

    encoders = _build_encoders(cfg, state, fmt, which)
    base = run_params(cfg, state, fmt, checkpoint)
    base["evaluated_at"] = _dt.datetime.now().isoformat(timespec="seconds")
    base["eval_device"] = dev.type
    base["preset"] = preset
    rows: list[dict] = []

    def row(protocol: str, encoder: str, metric: str, value: float, used_pool: str, extra: dict) -> None:
        rows.append({**base, "protocol": protocol, "pool": used_pool, "encoder": encoder, **extra,
                     "metric": metric, "value": float(value)})

    def done(protocol: str) -> None:
        if verbose:
            print(_protocol_line(protocol, [r for r in rows if r["protocol"] == protocol]), flush=True)

    if verbose:
        print(f"evaluating {checkpoint}: {', '.join(protos)}" + (f" -> {results}" if results is not None else ""),
              flush=True)

    frozen = [p for p in protos if p in ("knn", "linear")]
    if frozen:
        train_set, val_set = build_eval_datasets(cfg)
        for enc_name, encoder in encoders.items():
            encoder.to(dev)
            feats = {}
            t_feat = time.perf_counter()
            for split, ds in (("train", train_set), ("val", val_set)):
                key = feature_key(checkpoint=checkpoint, encoder=enc_name, split=split, pool=pool, config=cfg_dict)
                feats[split] = cache.get(key, lambda ds=ds, split=split: extract_features(
                    encoder, ds, pool=pool, batch_size=bs, device=dev, num_workers=cfg.data.num_workers,
                    precision=precision, progress=progress, desc=f"features {enc_name}/{split}"))
            feat_seconds = time.perf_counter() - t_feat
            (xtr, ytr), (xva, yva) = feats["train"], feats["val"]
            c = _num_classes(train_set, torch.cat([ytr, yva]))
            if "knn" in frozen:
                t0 = time.perf_counter()
                acc = knn_accuracy(xtr, ytr, xva, yva, k=knn_k, temperature=knn_temperature, num_classes=c,
                                   device=dev)
                extra = {"knn_k": knn_k, "knn_temperature": knn_temperature}
                row("knn", enc_name, "knn_top1", acc, pool, extra)
                row("knn", enc_name, "knn_seconds", time.perf_counter() - t0 + feat_seconds, pool, extra)
            if "linear" in frozen:
                res = train_linear_probe(xtr, ytr, xva, yva, lin, num_classes=c, device=dev, seed=cfg.seed,
                                         progress=progress)
                extra = {f"probe_{f.name}": getattr(lin, f.name) for f in dataclasses.fields(lin)}
                row("linear", enc_name, "linear_top1", res.top1, pool, extra)
                row("linear", enc_name, "linear_train_top1", res.train_top1, pool, extra)
                row("linear", enc_name, "linear_seconds", res.seconds + feat_seconds, pool, extra)
            encoder.cpu()
        for protocol in frozen:
            done(protocol)

    if "finetune" in protos:
        ft_train, ft_val = build_finetune_datasets(cfg, ft)
        c = _num_classes(ft_train)
        ft_pool = ft.pool or pool
        for enc_name in which:
            # a fresh copy: finetuning changes the encoder in place
            encoder = _build_encoders(cfg, state, fmt, (enc_name,))[enc_name]
            res = finetune(encoder, ft_train, ft_val, c, ft, pool=ft_pool, device=dev, seed=cfg.seed,
                           num_workers=cfg.data.num_workers, precision=precision, progress=progress,
                           max_steps=finetune_max_steps)
            extra = {f"ft_{f.name}": (str(v) if isinstance(v, tuple) else v)
                     for f in dataclasses.fields(ft) for v in [getattr(ft, f.name)]}
            extra["ft_max_steps"] = finetune_max_steps
            row("finetune", enc_name, "finetune_top1", res.top1, ft_pool, extra)
            row("finetune", enc_name, "finetune_seconds", res.seconds, ft_pool, extra)
        done("finetune")

    if decoder_protos:
        from study.evaluation.context_completion import completion_protocol
        from study.evaluation.samples import build_models, samples_protocol

        models = build_models(cfg, state, fmt, which)
        for protocol in decoder_protos:
            if protocol == "samples":
                out = samples_protocol(cfg, models, figures=figures, device=dev)
            else:
                out = completion_protocol(cfg, models, device=dev)
            for r in out:
                extra = {key: v for key, v in r.items() if key not in ("encoder", "metric", "value")}
                row(protocol, r["encoder"], r["metric"], r["value"], None, extra)
            done(protocol)

    if results is not None and rows:
        _save_rows(results, rows)
        if verbose:
            print(f"{len(rows)} rows -> {results}")
    return rows


class ResultsNotSaved(UserError):
    """The results table could not be written at the end; the rows are in a side file."""


def _save_rows(results: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``results``; if that fails, keep them in a side file and say where."""
    from study.results import append_rows, write_results

    try:
        append_rows(results, rows)
        return
    except (OSError, ValueError, UserError) as exc:
        error = one_line(exc)
    import tempfile

    name = f"{Path(results).stem}.unsaved-{_dt.datetime.now():%Y%m%d-%H%M%S}.csv"
    for folder in (Path(results).parent, Path(tempfile.gettempdir())):
        try:
            side = write_results(folder / name, rows)
        except OSError:
            continue
        raise ResultsNotSaved(f"could not append the {len(rows)} result rows to {results} ({error}); they are "
                              f"saved in {side}")
    raise ResultsNotSaved(f"could not append the {len(rows)} result rows to {results} ({error}), nor save "
                          "them in a side file; rerun with another --results")


_HEADLINE = {"knn": ("knn_top1",), "linear": ("linear_top1",), "finetune": ("finetune_top1",),
             "samples": ("sample_diversity",), "completion": ("cc_precision", "cc_recall", "oracle_accuracy")}


def _protocol_line(protocol: str, rows: list[dict]) -> str:
    """One line per protocol: its headline metric per encoder and its time."""
    parts = []
    for metric in _HEADLINE[protocol]:
        vals = {r["encoder"]: r["value"] for r in rows if r["metric"] == metric}
        shown = "  ".join(f"{enc} {v:.4g}" if metric == "sample_diversity" else f"{enc} {100 * v:.2f}%"
                          for enc, v in vals.items())
        parts.append(f"{metric} {shown}")
    seconds = sum(r["value"] for r in rows if r["metric"] == f"{protocol}_seconds")
    timing = f"  ({seconds:.1f} s)" if seconds else ""
    return f"  {protocol:<10} " + " | ".join(parts) + timing


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m study evaluate`` (including --config / --set)."""
    parser.add_argument("--checkpoint", required=True,
                        help="this project's checkpoint.pt / snapshots/epoch_*.pt, or a facebookresearch MAE .pth")
    parser.add_argument("--protocols", default="knn,linear",
                        help=f"comma-separated, from {','.join(PROTOCOLS)} (default: knn,linear)")
    parser.add_argument("--results", default=DEFAULT_RESULTS,
                        help=f"results table to append to (default {DEFAULT_RESULTS})")
    parser.add_argument("--config", default=None,
                        help="YAML config; only for checkpoints without one (facebookresearch format)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/data/in100 (repeatable)")
    parser.add_argument("--pool", choices=POOLS, default="cls",
                        help="frozen features for k-NN / linear: cls token or mean of patch tokens (default cls)")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                        help="linear-probe and finetune settings (auto: gpu on CUDA, else cpu)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="override the preset's finetune epochs")
    parser.add_argument("--linear-epochs", type=int, default=None, help="override the preset's linear-probe epochs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="default: the config's device")
    parser.add_argument("--batch-size", type=int, default=None, help="feature-extraction batch size")
    parser.add_argument("--feature-cache", default=None, help="folder to keep extracted features in (reused)")
    parser.add_argument("--no-random-baseline", action="store_true",
                        help="skip the random-init baseline rows (they are on by default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    parser.add_argument("--figures", default=DEFAULT_FIGURES,
                        help=f"folder for the samples protocol's figure (default {DEFAULT_FIGURES})")


def run_from_args(args: argparse.Namespace) -> int:
    """The ``evaluate`` command: 0, or 2 with one line ``error: ...`` on stderr for a user error."""
    from study.errors import run_command

    return run_command(lambda: _run(args), debug=getattr(args, "debug", False))


def _run(args: argparse.Namespace) -> int:
    dev_preset = args.preset
    linear = finetune_cfg = None
    if args.linear_epochs is not None or args.finetune_epochs is not None:
        if dev_preset == "auto":
            cfg, _, _ = load_for_evaluation(args.checkpoint, args.config, args.overrides)
            dev_preset = "gpu" if _resolve_device(args.device, cfg).type == "cuda" else "cpu"
        if args.linear_epochs is not None:
            linear = linear_probe_settings(dev_preset, epochs=args.linear_epochs)
        if args.finetune_epochs is not None:
            finetune_cfg = finetune_settings(dev_preset, epochs=args.finetune_epochs)
    evaluate(args.checkpoint, args.protocols, args.results, config=args.config, overrides=args.overrides,
             pool=args.pool, knn_k=args.knn_k, knn_temperature=args.knn_temperature, preset=dev_preset,
             linear=linear, finetune_cfg=finetune_cfg, random_baseline=not args.no_random_baseline,
             device=args.device, batch_size=args.batch_size, feature_cache=args.feature_cache,
             threads=args.threads, progress=not args.quiet, verbose=not args.quiet, figures=args.figures)
    return 0
