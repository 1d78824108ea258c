"""What every evaluation protocol starts from: the checkpoint, its config, and the models to evaluate.

Shared by the ``evaluate`` command (:mod:`study.evaluation.run`), the decoder
protocols (:mod:`study.evaluation.samples`,
:mod:`study.evaluation.context_completion`) and the sample figures, so that a
checkpoint is read, checked and turned into models in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch

from study.train.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, require_finite
from study.config import Config, apply_overrides, config_from_dict, load_config
from study.utils.errors import UserError, one_line
from study.methods.model import build_model
from study.models import load_pretrained_encoder
from study.utils.device import resolve_device, seed_everything

__all__ = ["EvaluationError", "NonFiniteFeatures", "ENCODERS", "resolve_checkpoint", "load_for_evaluation",
           "require_study_format", "require_labels", "LABELLED_PROTOCOLS", "build_encoders", "build_models",
           "load_models", "eval_device"]

ENCODERS = ("pretrained", "random")


class EvaluationError(UserError, ValueError):
    """A bad evaluate request (unknown protocol, missing config for a foreign checkpoint...)."""


class NonFiniteFeatures(EvaluationError):
    """An encoder's features hold NaN or inf: every metric of it would be meaningless, so evaluation stops."""


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint file a ``--checkpoint`` names: the file itself, or a run folder's ``checkpoint.pt``."""
    path = Path(checkpoint)
    if path.is_dir():
        if (path / CHECKPOINT).is_file():
            return path / CHECKPOINT
        snapshots = sorted((path / "snapshots").glob("epoch_*.pt")) if (path / "snapshots").is_dir() else []
        hint = f" (it has snapshots, e.g. {snapshots[-1]})" if snapshots else ""
        raise FileNotFoundError(f"checkpoint not found: {path} is a folder without {CHECKPOINT}{hint}; give a run "
                                "folder or a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_for_evaluation(checkpoint: str | Path, config: str | Path | None = None,
                        overrides: Sequence[str] = ()) -> tuple[Config, dict, str]:
    """Read a checkpoint of either format; return ``(cfg, state, format)``.

    ``format`` is ``"study"`` (this project's: it holds its config; ``overrides``
    apply on top) or ``"facebookresearch"`` (only ``"model"``: ``config`` and/or
    ``overrides`` describe the architecture and the data). Weights holding NaN
    or inf are refused (:class:`CheckpointError`) before any model is built.
    """
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise EvaluationError(f"{path} is neither this project's checkpoint (keys model, config, epoch) nor a "
                              f"facebookresearch MAE one (key model); it has {keys}")
    if isinstance(state["model"], Mapping):
        require_finite(state["model"], f"checkpoint {path}")
    if "config" in state:
        if config is not None:
            raise EvaluationError(f"{path} carries its own config; drop --config (use --set to change fields, "
                                  "e.g. --set data.root=...)")
        return config_from_dict(apply_overrides(state["config"], overrides)), state, "study"
    if config is None and not overrides:
        raise EvaluationError(f"{path} has no config (facebookresearch format): pass --config (e.g. "
                              "experiments/configs/in1k-vit-b.yaml) and/or --set to describe its architecture "
                              "and the evaluation data")
    return load_config(config, list(overrides)), state, "facebookresearch"


def require_study_format(fmt: str, protocols: Sequence[str]) -> None:
    """The decoder protocols need this project's checkpoints: facebookresearch's hold an encoder only."""
    if fmt != "study":
        raise EvaluationError(f"{', '.join(protocols)} need the decoder: only this project's checkpoints (with a "
                              "config) are supported, not the encoder-only facebookresearch format")


LABELLED_PROTOCOLS = ("knn", "linear", "finetune")  # they score class predictions


def require_labels(cfg: Config, protocols: Sequence[str]) -> None:
    """Refuse the protocols that score class predictions on a config whose images have no labels."""
    need = [p for p in protocols if p in LABELLED_PROTOCOLS]
    if cfg.data.labels == "none" and need:
        raise EvaluationError(f"{', '.join(need)} need class labels, and data.labels=none gives every image the "
                              f"same one ({cfg.data.root}); evaluate on a labelled folder with --set "
                              "data.root=DIR --set data.labels=folders")


def _seeded_model(cfg: Config) -> torch.nn.Module:
    """The model of ``cfg`` right after seeding with ``cfg.seed``: the draw pretraining starts from."""
    seed_everything(cfg.seed)
    return build_model(cfg)


def build_encoders(cfg: Config, state: dict, fmt: str, which: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The encoders to evaluate: "pretrained" (the checkpoint's weights) and/or "random" (seeded init)."""
    out = {}
    if "pretrained" in which:
        model = _seeded_model(cfg)
        try:
            if fmt == "study":
                model.load_state_dict(state["model"])
            else:
                load_pretrained_encoder(model.encoder, state)
        except (RuntimeError, ValueError) as exc:  # names or shapes differ: another architecture
            detail = one_line(exc)
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            fix = ("drop the --set model.* overrides: the checkpoint's own config describes it" if fmt == "study"
                   else "pass the --config / --set model.* of the architecture it was trained with")
            raise CheckpointError(f"the checkpoint's weights do not fit the model of this config ({detail}); "
                                  f"{fix}") from exc
        out["pretrained"] = model.encoder
    if "random" in which:
        out["random"] = _seeded_model(cfg).encoder
    return out


def build_models(cfg: Config, state: dict, fmt: str, which: Sequence[str] = ("pretrained",)) -> dict:
    """Whole models (encoder and decoder) for ``which`` in ("pretrained", "random"), in eval mode.

    "random" is the seeded initialisation of ``cfg`` (its encoder is the
    random-init baseline of the other protocols)."""
    require_study_format(fmt, ("samples", "completion"))
    out = {}
    for name in which:
        if name not in ENCODERS:
            raise ValueError(f"unknown model {name!r}")
        model = _seeded_model(cfg)
        if name == "pretrained":
            model.load_state_dict(state["model"])
        out[name] = model.eval()
    return out


def load_models(checkpoint: str | Path, which: Sequence[str] = ("pretrained",), overrides: Sequence[str] = ()):
    """``(cfg, state, {name: model})`` of a checkpoint (full ``checkpoint.pt`` or a weights-only copy)."""
    cfg, state, fmt = load_for_evaluation(checkpoint, None, overrides)
    return cfg, state, build_models(cfg, state, fmt, which)


def eval_device(device: str | None, cfg: Config, local_rank: int = 0) -> torch.device:
    """``--device`` if given, else the config's (``auto``: CUDA when there is one; the ``local_rank``-th GPU)."""
    return resolve_device(device or cfg.device, local_rank)
