"""The ``evaluate`` command line: arguments, the samples figure, one-line errors.

The evaluation itself is :func:`study.evaluation.run.evaluate`; this module
adds what only the command needs: parsing, the presets chosen by
``--linear-epochs`` / ``--linear-augment`` / ``--finetune-epochs``, and drawing the ``samples``
protocol's figure into ``--figures`` (evaluation hands over the data and never
imports the figures).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from study.utils.args import nonnegative_int, positive_float, positive_int, seed_list
from study.utils.errors import run_command
from study.evaluation.features import POOLS
from study.evaluation.knn import DEFAULT_KS
from study.evaluation.finetune import finetune_settings
from study.evaluation.linear_probe import linear_probe_settings
from study.evaluation.run import DEFAULT_RESULTS, PROTOCOLS, evaluate, parse_protocols
from study.evaluation.setup import EvaluationError, eval_device, load_for_evaluation
from study.figures.samples import draw_samples
from study.utils.io import writable_folder

__all__ = ["DEFAULT_FIGURES", "add_arguments", "run_from_args"]

DEFAULT_FIGURES = "runs/figures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m study evaluate`` (including --config / --set)."""
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its checkpoint.pt), this project's checkpoint.pt / snapshots/epoch_*.pt, "
                             "or a facebookresearch MAE .pth")
    parser.add_argument("--protocols", default="knn,linear",
                        help=f"comma-separated, from {','.join(PROTOCOLS)} (default: knn,linear)")
    parser.add_argument("--results", default=DEFAULT_RESULTS,
                        help=f"results table to append to (default {DEFAULT_RESULTS})")
    parser.add_argument("--config", default=None,
                        help="YAML config; only for checkpoints without one (facebookresearch format)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/data/in100 (repeatable)")
    parser.add_argument("--pool", choices=POOLS, default=None,
                        help="frozen features for k-NN / linear: the cls token or the mean of patch tokens (default: "
                             "cls for data.name=imagenet100, as MAE and DINO; mean elsewhere, as the committed "
                             "MNIST and synthetic results)")
    parser.add_argument("--knn-k", "--knn-ks", dest="knn_ks", type=_ks, default=None, metavar="K[,K...]",
                        help="neighbours that vote in the k-NN protocol, comma-separated, each at most the training "
                             f"images; all from one pass, a row each (default {','.join(map(str, DEFAULT_KS))}, "
                             "those the training set has; figures read k = 20)")
    parser.add_argument("--knn-temperature", type=positive_float, default=0.07,
                        help="each neighbour votes exp(cosine similarity / T) (default 0.07, as DINO)")
    parser.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                        help="linear-probe and finetune settings (auto: gpu on CUDA, else cpu); the gpu finetune is "
                             "MAE-Lite's ViT-Tiny recipe up to ViT-T's width (192), else MAE's ViT-B one")
    parser.add_argument("--finetune-epochs", type=positive_int, default=None,
                        help="override the preset's finetune epochs")
    parser.add_argument("--finetune-seeds", type=seed_list, default=None, metavar="S[,S...]",
                        help="one finetune per seed, a finetune_top1 row each with its finetune_seed, e.g. 0,1,2 "
                             "(default: one, seeded with the checkpoint's pretraining seed)")
    parser.add_argument("--finetune-workers", type=nonnegative_int, default=None, metavar="N",
                        help="DataLoader workers of each finetune process, i.e. each GPU under torchrun (default: "
                             "the config's data.num_workers)")
    parser.add_argument("--finetune-max-steps", type=positive_int, default=None, metavar="N",
                        help="stop each finetune after N optimizer steps (smoke runs; the lr schedule still spans "
                             "its epochs)")
    parser.add_argument("--linear-epochs", type=positive_int, default=None,
                        help="override the preset's linear-probe epochs")
    parser.add_argument("--linear-min-steps", type=positive_int, default=None,
                        help="the optimizer steps the probe's batch is chosen to reach (default: the preset's; gpu: "
                             "MAE's 7000)")
    parser.add_argument("--linear-augment", action="store_true",
                        help="train the linear probe on new RandomResizedCrop + flip views every epoch, as MAE, "
                             "instead of features extracted once (an encoder pass per epoch: for GPU runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="default: the config's device")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="feature-extraction batch size")
    parser.add_argument("--feature-cache", default=None,
                        help="folder to keep extracted features in, reused while the checkpoint, the images and "
                             "the settings they were computed with are unchanged")
    parser.add_argument("--no-random-baseline", action="store_true",
                        help="skip the random-init baseline rows (they are on by default)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    parser.add_argument("--figures", default=DEFAULT_FIGURES,
                        help=f"folder for the samples protocol's figure (default {DEFAULT_FIGURES})")


def run_from_args(args: argparse.Namespace) -> int:
    """The ``evaluate`` command: 0, or 2 with one line ``error: ...`` on stderr for a user error."""
    return run_command(lambda: _run(args), debug=getattr(args, "debug", False))


def _run(args: argparse.Namespace) -> int:
    protocols = parse_protocols(args.protocols)
    figures = Path(args.figures)
    if "samples" in protocols:
        try:
            writable_folder(figures)  # now, not after the protocols have run
        except OSError as exc:
            raise EvaluationError(f"cannot write the samples figure to --figures {figures}: "
                                  f"{exc.strerror or exc}") from None
    preset = args.preset
    linear = finetune = None
    probe = {name: value for name, value in (("epochs", args.linear_epochs), ("augment", args.linear_augment or None),
                                             ("min_steps", args.linear_min_steps)) if value is not None}
    ft_flags = (args.finetune_epochs, args.finetune_seeds, args.finetune_workers)
    if probe or any(v is not None for v in ft_flags):
        if preset == "auto":
            cfg, _, _ = load_for_evaluation(args.checkpoint, args.config, args.overrides)
            preset = "gpu" if eval_device(args.device, cfg).type == "cuda" else "cpu"
        if probe:
            linear = linear_probe_settings(preset, **probe)
        if any(v is not None for v in ft_flags):
            finetune = _finetune_settings(args, preset)
    evaluate(args.checkpoint, protocols, args.results, config=args.config, overrides=args.overrides,
             feature_cache=args.feature_cache, threads=args.threads,
             on_samples=lambda drawing: _draw_samples(drawing, args.checkpoint, figures),
             pool=args.pool, knn_ks=args.knn_ks, knn_temperature=args.knn_temperature, preset=preset,
             linear=linear, finetune=finetune, random_baseline=not args.no_random_baseline,
             device=args.device, batch_size=args.batch_size, finetune_max_steps=args.finetune_max_steps,
             progress=not args.quiet, verbose=not args.quiet)
    return 0


def _ks(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers >= 1, e.g. ``10,20,100,200``."""
    return tuple(positive_int(part) for part in text.split(","))


def _finetune_settings(args: argparse.Namespace, preset: str):
    """The preset's finetune settings with the --finetune-* flags; gpu picks its recipe by the encoder's width."""
    flags = (("epochs", args.finetune_epochs), ("seeds", args.finetune_seeds),
             ("num_workers", getattr(args, "finetune_workers", None)))
    changes = {name: value for name, value in flags if value is not None}
    width = None
    if preset == "gpu":
        cfg, _, _ = load_for_evaluation(args.checkpoint, args.config, args.overrides)
        width = cfg.model.embed_dim
    return finetune_settings(preset, embed_dim=width, **changes)


def _draw_samples(drawing, checkpoint: str, figures: Path) -> None:
    """The samples figure, named by the checkpoint's run folder as well as its objective (two runs of one
    objective do not overwrite each other's), and its path printed."""
    source = Path(checkpoint).resolve()
    run = (source if source.is_dir() else source.parent).name
    drawing = dataclasses.replace(drawing, name=f"samples_{run}_{drawing.name.removeprefix('samples_')}")
    print("samples figure: " + ", ".join(str(p) for p in draw_samples(drawing, figures)))
