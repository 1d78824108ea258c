"""The ``evaluate`` command's library call: probe a checkpoint with every protocol (CLI: :mod:`study.cli.evaluate`).

Protocols: k-NN, linear probe and finetuning on the encoder, ``samples``
(:mod:`study.evaluation.samples`) and ``completion``
(:mod:`study.evaluation.context_completion`) on the decoder. Each runs on the
pretrained model and on the random initialisation of the same seed, so every number
has its baseline (``encoder = "pretrained"`` / ``"random"``); frozen features are
extracted once per encoder, split and pool and shared by k-NN and the linear probe.
A project checkpoint carries its config (``--set`` applies on top); a
facebookresearch MAE ``.pth`` takes its architecture from ``--config`` / ``--set``.
Rows go to the tidy table (:mod:`study.evaluation.results`), which is checked before
any protocol runs. A protocol that raises does not take the others with it: they run
and their rows are saved, then :class:`ProtocolFailed` names each failure
(:class:`ProtocolUserError`, one ``error:`` line, when every cause is the user's).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from study.config import Config
from study.data.datasets import build_eval_datasets
from study.utils.provenance import provenance
from study.utils.errors import USER_ERRORS, UserError, WriteError, one_line
from study.evaluation.context_completion import check_synthetic, completion_protocol
from study.evaluation.distributed import check_torchrun_protocols, join_evaluation, per_process_batch, torchrun_world
from study.evaluation.features import (POOLS, FeatureCache, crop_features, crop_views, default_pool, extract_features,
                                       feature_key)
from study.evaluation.finetune import (FinetuneSettings, build_finetune_datasets, finetune, finetune_columns,
                                       finetune_settings)
from study.evaluation.knn import checked_ks, knn_accuracy, resolve_ks
from study.evaluation.linear_probe import LinearProbeSettings, linear_probe_settings, probe_plan, train_linear_probe
from study.evaluation.samples import SamplesDrawing, samples_protocol
from study.evaluation.setup import (ENCODERS, EvaluationError, NonFiniteFeatures, build_encoders, build_models,
                                    eval_device, load_for_evaluation, require_labels, require_study_format,
                                    resolve_checkpoint)
from study.evaluation.results import append_rows, check_table, save_rows_aside
from study.utils.device import Dist, cpu_threads

__all__ = ["PROTOCOLS", "DECODER_PROTOCOLS", "DEFAULT_RESULTS", "EvaluateSettings", "evaluate", "parse_protocols",
           "run_params", "EvaluationError", "ResultsNotSaved", "ProtocolFailed", "ProtocolUserError"]

PROTOCOLS = ("knn", "linear", "finetune", "samples", "completion")
DEFAULT_RESULTS = "runs/results.csv"
DECODER_PROTOCOLS = ("samples", "completion")  # read the decoder, not pooled features: no pool


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


@dataclass(frozen=True)
class EvaluateSettings:
    """How to evaluate (what :func:`evaluate` takes as keywords), checked on creation."""

    protocols: tuple[str, ...] = ("knn", "linear")
    pool: str | None = None  # frozen features: "cls" token or "mean" of patch tokens; None: default_pool(data.name)
    knn_ks: tuple[int, ...] | None = None  # None: DEFAULT_KS (10, 20, 100, 200) up to the training-set size
    knn_k: int | None = None  # one k, the same as knn_ks=(knn_k,), for callers that name one
    knn_temperature: float = 0.07
    preset: str = "auto"  # linear-probe and finetune settings: cpu, gpu, or auto (gpu on CUDA)
    linear: LinearProbeSettings | None = None  # replaces the preset's
    finetune: FinetuneSettings | None = None  # replaces the preset's
    random_baseline: bool = True
    device: str | None = None  # None: the config's
    batch_size: int | None = None  # feature extraction; None: 256 on CPU, 512 on CUDA
    finetune_max_steps: int | None = None  # cut finetuning short (smoke tests)
    progress: bool = True
    verbose: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocols", tuple(parse_protocols(self.protocols)))
        if self.pool is not None and self.pool not in POOLS:
            raise EvaluationError(f"pool must be one of {list(POOLS)}, got {self.pool!r}")
        object.__setattr__(self, "knn_ks", checked_ks(self.knn_k, self.knn_ks))
        if not self.knn_temperature > 0:
            raise EvaluationError(f"knn_temperature must be > 0, got {self.knn_temperature!r}")
        if self.batch_size is not None and not self.batch_size >= 1:
            raise EvaluationError(f"batch_size must be >= 1, got {self.batch_size!r}")

    @property
    def encoders(self) -> tuple[str, ...]:
        return ENCODERS if self.random_baseline else ("pretrained",)


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
        "synthetic_mean_shift": cfg.data.synthetic.mean_shift if cfg.data.name == "synthetic" else None,
        "synthetic_cue": cfg.data.synthetic.cue if cfg.data.name == "synthetic" else None,
        "synthetic_distractor": cfg.data.synthetic.distractor if cfg.data.name == "synthetic" else None,
        "sign_flip_p": cfg.data.sign_flip.p,
        "sign_flip_scope": cfg.data.sign_flip.scope if cfg.data.sign_flip.p > 0 else None,
        "img_size": cfg.model.img_size,
        "patch_size": cfg.model.patch_size,
        "embed_dim": cfg.model.embed_dim,
        "depth": cfg.model.depth,
        "decoder_dim": cfg.model.decoder_dim,
        "decoder_depth": cfg.model.decoder_depth,
        "checkpoint": str(checkpoint),
        "checkpoint_format": fmt,
        **code_columns(state),
    }


def code_columns(state: dict) -> dict:
    """The code and versions that evaluated a row, and the commit that pretrained its checkpoint (if it says)."""
    now, then = provenance(), state.get("provenance") or {}
    return {"git_commit": now["git_commit"], "git_dirty": now["git_dirty"], "torch_version": now["torch"],
            "timm_version": now["timm"], "pretrain_git_commit": then.get("git_commit")}


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
             overrides: Sequence[str] = (), feature_cache: str | Path | None = None,
             cache: FeatureCache | None = None, threads: int | None = None,
             on_samples: Callable[[SamplesDrawing], object] | None = None, **settings) -> list[dict]:
    """Evaluate ``checkpoint`` with ``protocols``; append and return the result rows.

    ``results=None`` returns the rows without writing. ``settings`` are the
    fields of :class:`EvaluateSettings` (``pool``: by default cls on ImageNet-100,
    mean elsewhere; ``knn_ks``, ``preset``, ``linear``,
    ``finetune``, ``random_baseline``: the random-init rows are on by default,
    turn them off only to save a GPU finetune of a baseline already in the
    table, ...). ``threads`` sets torch's CPU threads for the call (the linear
    probe trains on one CPU thread unless it crops every epoch). ``on_samples`` receives the
    ``samples`` protocol's drawing of the pretrained model (the command draws it).
    A failed protocol raises :class:`ProtocolFailed` after the other protocols'
    rows are saved; they are also on its ``rows`` (for ``results=None``). Torchrun: :mod:`.distributed`.
    """
    s = EvaluateSettings(protocols=tuple(parse_protocols(protocols)), **settings)
    check_torchrun_protocols(s.protocols, torchrun_world())
    checkpoint = resolve_checkpoint(checkpoint)  # a run folder stands for its checkpoint.pt
    with cpu_threads(threads):
        if results is not None:
            check_table(results)  # now, not after every protocol has run
        cache = cache or FeatureCache(feature_cache)  # a --feature-cache that is a file fails here
        cfg, state, fmt = load_for_evaluation(checkpoint, config, overrides)
        dist, s, results = join_evaluation(eval_device(s.device, cfg).type, s, results)
        require_labels(cfg, s.protocols)
        decoder_protos = [p for p in s.protocols if p in DECODER_PROTOCOLS]
        if decoder_protos:
            require_study_format(fmt, decoder_protos)
        if "completion" in s.protocols:
            check_synthetic(cfg)
        run = _Evaluation(checkpoint, cfg, state, fmt, s, cache, dist)
        if s.verbose:
            print(f"evaluating {checkpoint}: {', '.join(s.protocols)}"
                  + (f" -> {results}" if results is not None else ""), flush=True)
        run.frozen_protocols()
        if "finetune" in s.protocols:
            run.finetune_protocol()
        if decoder_protos:
            run.decoder_protocols(decoder_protos, on_samples)
    _finish(run, results)
    return run.rows


def _finish(run: "_Evaluation", results: str | Path | None) -> None:
    """Save the rows, then raise :class:`ProtocolFailed` if a protocol failed."""
    try:
        if results is not None and run.rows:
            _save_rows(results, run.rows)
            if run.s.verbose:
                print(f"{len(run.rows)} rows -> {results}")
    except ResultsNotSaved as exc:
        if not run.failed:
            raise
        saved = one_line(exc)
    else:
        saved = _where_rows_are(run.rows, results)
    if run.failed:
        raise _protocol_failure(run.failed, run.rows, saved) from next(iter(run.failed.values()))


class _Evaluation:
    """One checkpoint's evaluation: the resolved device and presets, and the rows as they come."""

    def __init__(self, checkpoint, cfg: Config, state: dict, fmt: str, s: EvaluateSettings,
                 cache: FeatureCache, dist: Dist = Dist()) -> None:
        if s.pool is None:  # resolved once: every protocol, finetune's default pool included, reads this one
            s = dataclasses.replace(s, pool=default_pool(cfg.data.name))
        self.checkpoint, self.cfg, self.state, self.fmt, self.s, self.cache = checkpoint, cfg, state, fmt, s, cache
        self.dist, self.device = dist, eval_device(s.device, cfg, dist.local_rank)
        self.preset = s.preset if s.preset != "auto" else ("gpu" if self.device.type == "cuda" else "cpu")
        self.linear = s.linear or linear_probe_settings(self.preset)
        self.finetune = s.finetune or finetune_settings(self.preset, embed_dim=cfg.model.embed_dim)
        if "finetune" in s.protocols:  # a batch the processes cannot share is refused before any work
            per_process_batch(self.finetune.batch_size, dist.world)
        self.base = run_params(cfg, state, fmt, checkpoint)
        self.base.update(evaluated_at=_dt.datetime.now().isoformat(timespec="seconds"),
                         eval_device=self.device.type, preset=self.preset)
        self.rows: list[dict] = []
        self.failed: dict[str, Exception] = {}  # protocol -> what stopped it
        self.notes: dict[str, str] = {}  # protocol -> said after its line
        self.extract_batch = s.batch_size or (256 if self.device.type == "cpu" else 512)

    @contextmanager
    def attempt(self, *protocols: str):
        """Run a block of ``protocols``; an error there marks them failed and drops their rows so far,
        so the other protocols still run and keep theirs."""
        try:
            yield
        except NonFiniteFeatures:
            raise  # the encoder is broken, not the protocol: no row of any protocol is kept or written
        except Exception as exc:  # not KeyboardInterrupt: Ctrl-C stops the whole evaluation
            for protocol in protocols:
                if protocol not in self.failed:
                    self.failed[protocol] = exc
                    if self.s.verbose:
                        print(f"  {protocol:<10} failed: {_cause(exc)}", flush=True)
            self.rows = [r for r in self.rows if r["protocol"] not in protocols]

    def running(self, protocols: Sequence[str]) -> list[str]:
        return [p for p in protocols if p not in self.failed]

    def row(self, protocol: str, encoder: str, metric: str, value: float, pool: str | None, extra: dict) -> None:
        self.rows.append({**self.base, "protocol": protocol, "pool": pool, "encoder": encoder, **extra,
                          "metric": metric, "value": float(value)})

    def done(self, protocol: str) -> None:
        if self.s.verbose:
            print(_protocol_line(protocol, [r for r in self.rows if r["protocol"] == protocol])
                  + self.notes.get(protocol, ""), flush=True)

    def _features(self, enc_name: str, encoder: torch.nn.Module, datasets: dict) -> dict:
        """``{split: (features, labels)}``, extracted once per encoder, split and pool (cached)."""
        s, cfg = self.s, self.cfg
        cfg_dict = dataclasses.asdict(cfg)
        feats = {}
        for split, ds in datasets.items():
            key = feature_key(checkpoint=self.checkpoint, encoder=enc_name, split=split, pool=s.pool,
                              config=cfg_dict, dataset=ds)
            feats[split] = self.cache.get(key, lambda ds=ds, split=split: extract_features(
                encoder, ds, pool=s.pool, batch_size=self.extract_batch, device=self.device,
                num_workers=cfg.data.num_workers, precision=cfg.precision, progress=s.progress,
                desc=f"features {enc_name}/{split}"))
        return feats

    def frozen_protocols(self) -> None:
        """k-NN and the linear probe, on features shared between them."""
        frozen = [p for p in self.s.protocols if p in ("knn", "linear")]
        if not frozen:
            return
        train_set, val_set = build_eval_datasets(self.cfg)
        ks = ()
        if "knn" in frozen:  # a k the training set cannot give is refused before any feature is computed
            ks, self.notes["knn"] = resolve_ks(self.s.knn_ks, len(train_set))
        with self.attempt(*frozen):
            for enc_name, encoder in build_encoders(self.cfg, self.state, self.fmt, self.s.encoders).items():
                if not self.running(frozen):
                    break
                encoder.to(self.device)
                t_feat = time.perf_counter()
                feats = self._features(enc_name, encoder, {"train": train_set, "val": val_set})
                feat_seconds = time.perf_counter() - t_feat
                c = _num_classes(train_set, torch.cat([feats["train"][1], feats["val"][1]]))
                if "knn" in self.running(frozen):
                    with self.attempt("knn"):
                        self._knn(enc_name, feats, c, feat_seconds, ks)
                if "linear" in self.running(frozen):
                    with self.attempt("linear"):
                        self._linear(enc_name, feats, c, feat_seconds, encoder, train_set)
                encoder.cpu()
        for protocol in self.running(frozen):
            self.done(protocol)

    def _knn(self, enc_name: str, feats: dict, num_classes: int, feat_seconds: float, ks: tuple[int, ...]) -> None:
        s = self.s
        (xtr, ytr), (xva, yva) = feats["train"], feats["val"]
        t0 = time.perf_counter()
        accs = knn_accuracy(xtr, ytr, xva, yva, ks=ks, temperature=s.knn_temperature, num_classes=num_classes,
                            device=self.device)
        for k, acc in accs.items():
            self.row("knn", enc_name, "knn_top1", acc, s.pool, {"knn_k": k, "knn_temperature": s.knn_temperature})
        # one pass answers every k: one time row, of no single k
        self.row("knn", enc_name, "knn_seconds", time.perf_counter() - t0 + feat_seconds, s.pool,
                 {"knn_k": None, "knn_temperature": s.knn_temperature})

    def _linear(self, enc_name: str, feats: dict, num_classes: int, feat_seconds: float, encoder: torch.nn.Module,
                train_set) -> None:
        s, lin = self.s, self.linear
        (xtr, ytr), (xva, yva) = feats["train"], feats["val"]
        if s.verbose and enc_name == s.encoders[0]:
            print(probe_plan(len(xtr), lin), flush=True)
        crops = self._crops(encoder, train_set) if lin.augment else None
        # the crops' encoder passes need torch's threads; the probe alone is faster on one
        res = train_linear_probe(xtr, ytr, xva, yva, lin, num_classes=num_classes, device=self.device,
                                 seed=self.cfg.seed, progress=s.progress, threads=None if crops else 1,
                                 epoch_features=crops)
        extra = {f"probe_{f.name}": getattr(lin, f.name) for f in dataclasses.fields(lin)}
        extra.update(linear_steps=res.steps, linear_batch=res.batch)
        self.row("linear", enc_name, "linear_top1", res.top1, s.pool, extra)
        self.row("linear", enc_name, "linear_train_top1", res.train_top1, s.pool, extra)
        self.row("linear", enc_name, "linear_seconds", res.seconds + feat_seconds, s.pool, extra)

    def _crops(self, encoder: torch.nn.Module, train_set) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        """Each probe epoch's features of new random crops of the training images (``augment``)."""
        views, cfg = crop_views(train_set, self.cfg.model.img_size), self.cfg
        return lambda epoch: crop_features(
            encoder, views, seed=cfg.seed, epoch=epoch, pool=self.s.pool, batch_size=self.extract_batch,
            device=self.device, num_workers=cfg.data.num_workers, precision=cfg.precision, progress=False)

    def finetune_protocol(self) -> None:
        with self.attempt("finetune"):
            self._finetune()
        if "finetune" not in self.failed:
            self.done("finetune")

    def _finetune(self) -> None:
        s, ft = self.s, self.finetune
        ft_train, ft_val = build_finetune_datasets(self.cfg, ft)
        c = _num_classes(ft_train)
        ft_pool = ft.pool or s.pool
        extra = finetune_columns(ft, s.finetune_max_steps, self.dist.world)
        for enc_name in s.encoders:
            # "seed" stays the pretraining seed (it also draws the random-init encoder); "finetune_seed"
            # draws the head, the batches and the augmentation
            for ft_seed in ft.seeds or (self.cfg.seed,):
                # a fresh copy each time: finetuning changes the encoder in place
                encoder = build_encoders(self.cfg, self.state, self.fmt, (enc_name,))[enc_name]
                res = finetune(encoder, ft_train, ft_val, c, ft, pool=ft_pool, device=self.device, seed=ft_seed,
                               num_workers=self.cfg.data.num_workers, precision=self.cfg.precision,
                               progress=s.progress, max_steps=s.finetune_max_steps, dist=self.dist)
                row_extra = {**extra, "finetune_seed": ft_seed}
                self.row("finetune", enc_name, "finetune_top1", res.top1, ft_pool, row_extra)
                self.row("finetune", enc_name, "finetune_seconds", res.seconds, ft_pool, row_extra)

    def decoder_protocols(self, protocols: Sequence[str], on_samples) -> None:
        """``samples`` and ``completion``: they need the whole model, decoder included."""
        models = {}
        with self.attempt(*protocols):
            models = build_models(self.cfg, self.state, self.fmt, self.s.encoders)
        for protocol in self.running(protocols):
            with self.attempt(protocol):
                self._decoder_protocol(protocol, models, on_samples)
            if protocol not in self.failed:
                self.done(protocol)

    def _decoder_protocol(self, protocol: str, models: dict, on_samples) -> None:
        if protocol == "samples":
            out = samples_protocol(self.cfg, models, on_samples=on_samples, device=self.device)
        else:
            out = completion_protocol(self.cfg, models, device=self.device)
        for r in out:
            extra = {key: v for key, v in r.items() if key not in ("encoder", "metric", "value")}
            self.row(protocol, r["encoder"], r["metric"], r["value"], None, extra)


class ResultsNotSaved(UserError):
    """The results table could not be written at the end; the rows are in a side file."""


class ProtocolFailed(RuntimeError):
    """One or more protocols raised; the others ran and their rows were saved (and are in ``rows``).

    Raised from the first failure, so its traceback is kept."""

    def __init__(self, message: str, failed: dict[str, Exception], rows: list[dict]) -> None:
        super().__init__(message)
        self.failed, self.rows = failed, rows


class ProtocolUserError(ProtocolFailed, UserError):
    """A :class:`ProtocolFailed` whose every cause is the user's to fix: one ``error:`` line, exit 2."""


def _cause(exc: Exception) -> str:
    """A user error's message; a crash's also names its exception class."""
    return one_line(exc) if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {one_line(exc)}"


def _where_rows_are(rows: list[dict], results: str | Path | None) -> str:
    if not rows:
        return "no protocol succeeded, so no rows were written"
    protocols = ", ".join(dict.fromkeys(r["protocol"] for r in rows))
    if results is None:
        return f"the {len(rows)} rows of {protocols} are on this error's .rows"
    return f"the {len(rows)} rows of {protocols} are in {results}"


def _protocol_failure(failed: dict[str, Exception], rows: list[dict], saved: str) -> ProtocolFailed:
    by_cause: dict[int, list[str]] = {}  # k-NN and the linear probe share one cause when features fail
    for protocol, exc in failed.items():
        by_cause.setdefault(id(exc), []).append(protocol)
    if len(by_cause) == 1:
        causes = f": {_cause(next(iter(failed.values())))}"
    else:
        each = "; ".join(f"{', '.join(names)}: {_cause(failed[names[0]])}" for names in by_cause.values())
        causes = f" ({each})"
    message = f"protocol{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed{causes}; {saved}"
    user = all(isinstance(exc, USER_ERRORS) for exc in failed.values())
    return (ProtocolUserError if user else ProtocolFailed)(message, failed, rows)


def _save_rows(results: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``results``; if that fails, keep them in a side file and say where."""
    try:
        append_rows(results, rows)
        return
    except WriteError as exc:
        if getattr(exc, "saved_in", None) is not None:  # append_rows saved them aside and says where
            raise ResultsNotSaved(one_line(exc)) from exc
        error = one_line(exc)
    except (OSError, ValueError, UserError) as exc:
        error = one_line(exc)

    side = save_rows_aside(results, rows, [Path(results).parent, Path(tempfile.gettempdir())])
    if side is not None:
        raise ResultsNotSaved(f"could not append the {len(rows)} result rows to {results} ({error}); they are "
                              f"saved in {side}")
    raise ResultsNotSaved(f"could not append the {len(rows)} result rows to {results} ({error}), nor save "
                          "them in a side file; rerun with another --results")


_HEADLINE = {"knn": ("knn_top1",), "linear": ("linear_top1",), "finetune": ("finetune_top1",),
             "samples": ("sample_diversity",), "completion": ("cc_precision", "cc_recall", "oracle_accuracy")}


def _protocol_line(protocol: str, rows: list[dict]) -> str:
    """One line per protocol: its headline metric per encoder (k-NN: at each k) and its time."""
    parts = []
    for metric in _HEADLINE[protocol]:
        vals: dict[str, list[float]] = {}
        for r in (r for r in rows if r["metric"] == metric):
            vals.setdefault(r["encoder"], []).append(r["value"])
        if metric == "sample_diversity":
            shown = "  ".join(f"{enc} {'/'.join(f'{v:.4g}' for v in vs)}" for enc, vs in vals.items())
        else:
            shown = "  ".join(f"{enc} {'/'.join(f'{100 * v:.2f}' for v in vs)}%" for enc, vs in vals.items())
        ks = list(dict.fromkeys(r["knn_k"] for r in rows if r["metric"] == metric and r.get("knn_k") is not None))
        label = f"{metric} k={'/'.join(map(str, ks))}" if len(ks) > 1 else metric
        parts.append(f"{label} {shown}")
    seconds = sum(r["value"] for r in rows if r["metric"] == f"{protocol}_seconds")
    timing = f"  ({seconds:.1f} s)" if seconds else ""
    return f"  {protocol:<10} " + " | ".join(parts) + timing
