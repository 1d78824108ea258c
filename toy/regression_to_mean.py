"""Regression to the mean on a toy with a known answer: least squares vs cIMLE.

For every mask strength s, seed and objective, the same MLPs are trained on
:class:`toy.conditionals.ToyTask` and measured against the analytic Bayes floor: the
test loss, a linear probe of h(x) for the class (trained and untrained), and whether
the model's samples name their class. At s = 1 that is judged by ``axis_accuracy``
(the class whose mode axis lies nearest): nearest-of-k draws the modes in to
1 - 2^(1-k) of the radius, which ``mode_accuracy`` would misread as another class,
and the energy distance cannot tell the right class's spread from another's. The
bar is the probe's, 0.90, since a sample reads the same noisy code. The collapse is
graded by principle, not tuning: a channel of fixed power (``channel_noise``; 0
brings the knife edge back), an auxiliary label that pays at every s, and class
means with growing gaps. Output goes to ``--out`` (default ``runs/toy``); only
``make toy`` writes the committed ``results/toy`` and ``figures/``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `toy` and `study` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from study.utils.console import interactive
from study.utils.args import OneLineParser
from study.utils.errors import UserError, run_command
from study.utils.io import atomic_write_text, writable_folder
from study.losses import cimle, least_squares, nearest_of_k_amplitude
from study.figures.toy import plot_toy
from study.evaluation.results import read_results, write_results
from study.utils.device import cpu_threads
from toy.conditionals import ToyConfig, ToyTask
from toy.models import Decoder, Encoder, channel

__all__ = ["TrainSettings", "train_one", "evaluate", "run_grid", "summarize", "acceptance", "main"]

CSV_NAME = "toy_results.csv"
SUMMARY_NAME = "summary.txt"
OBJECTIVES = ("ls", "cimle")
MEAN_SAMPLES = 64  # samples averaged for cIMLE's predictive mean
ENERGY_SAMPLES = 400  # model and true samples per class for the energy distance
PROBE_TRAIN, PROBE_TEST = 2000, 2000
TEST_SIZE = 4000


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    k: int = 2  # = modes per class: more samples could cover every class's modes without knowing the class
    dh: int = 8  # representation dim
    channel_noise: float = 0.5  # std of the representation channel's noise (toy.models); 0: a clean code
    dz: int = 4  # noise dim
    width: int = 64
    depth: int = 2


@dataclass
class Trained:
    encoder: Encoder
    decoder: Decoder
    untrained_encoder: Encoder


# ---- training ---------------------------------------------------------------

def _lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warmup then cosine decay to 0: the decay lets LS settle onto its floor."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _objective_loss(objective: str, encoder: Encoder, decoder: Decoder, x, y, settings: TrainSettings,
                    generator: torch.Generator, channel_gen: torch.Generator) -> torch.Tensor:
    k = settings.k
    h = channel(encoder(x), settings.channel_noise, channel_gen)  # [B, dh], shared by the k decodes
    if objective == "ls":
        return least_squares(decoder.mean_input(h), y)
    if objective == "cimle":
        return cimle(lambda z: decoder(h, z), y, k=k, noise_shape=decoder.dz, generator=generator).loss
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def train_one(task: ToyTask, s: float, objective: str, seed: int, settings: TrainSettings) -> Trained:
    """Train encoder + decoder on fresh samples (no finite training set, so no overfitting).

    The seed fixes the initialisation and the data stream, identically for both
    objectives, so LS and cIMLE start from the same encoder (paired comparison).
    """
    torch.manual_seed(seed)
    cfg = task.config
    encoder = Encoder(cfg.dx, settings.dh, settings.width, settings.depth)
    decoder = Decoder(settings.dh, settings.dz, cfg.dy, settings.width, settings.depth)
    untrained = copy.deepcopy(encoder)
    data_gen = torch.Generator().manual_seed(10_000 + seed)
    noise_gen = torch.Generator().manual_seed(20_000 + seed)
    channel_gen = torch.Generator().manual_seed(50_000 + seed)
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=settings.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, settings))
    for _ in range(settings.steps):
        batch = task.sample(settings.batch_size, s, data_gen)
        loss = _objective_loss(objective, encoder, decoder, batch.x, batch.y, settings, noise_gen, channel_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return Trained(encoder.eval(), decoder.eval(), untrained.eval())


# ---- evaluation -------------------------------------------------------------

def energy_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Energy distance 2 E|A-B| - E|A-A'| - E|B-B'| (Szekely & Rizzo; dcor's convention).

    This is the squared form (zero iff the distributions agree). The within-sample
    terms leave out the diagonal (U-statistics), so the estimate is unbiased and
    can dip slightly below 0 when the distributions match.
    """
    n, m = len(a), len(b)  # a: [n, d], b: [m, d]
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (n * (n - 1))
    bb = torch.cdist(b, b).sum() / (m * (m - 1))
    return 2 * ab - aa - bb


def linear_probe_accuracy(train_h, train_c, test_h, test_c, n_classes: int, steps: int = 200) -> float:
    """Multinomial logistic regression on standardised features, full-batch LBFGS.

    A small L2 penalty keeps the problem well posed when the classes separate.
    """
    mean, std = train_h.mean(0), train_h.std(0).clamp_min(1e-6)
    tr, te = (train_h - mean) / std, (test_h - mean) / std  # [N, dh]
    weight = torch.zeros(tr.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(tr @ weight + bias, train_c) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((te @ weight + bias).argmax(1) == test_c).float().mean())


def _probe(encoder: Encoder, task: ToyTask, s: float, seed: int, settings: TrainSettings) -> float:
    """Probe accuracy on probe data of its own; the same seed gives every encoder the same data
    and the same channel noise. The probe reads what the decoder reads: the channel's output."""
    gen = torch.Generator().manual_seed(40_000 + seed)
    train = task.sample(PROBE_TRAIN, s, gen, balanced=True)
    test = task.sample(PROBE_TEST, s, gen, balanced=True)
    with torch.no_grad():  # frozen features: the probe's gradient must not reach the encoder
        train_h = channel(encoder(train.x), settings.channel_noise, gen)  # [N, dh]
        test_h = channel(encoder(test.x), settings.channel_noise, gen)
    return linear_probe_accuracy(train_h, train.c, test_h, test.c, task.config.n_classes)


@torch.no_grad()
def _sample_model(model: Trained, objective: str, x: torch.Tensor, gen: torch.Generator,
                  channel_noise: float) -> torch.Tensor:
    """One model sample per context row: f(h, z) for cIMLE, the deterministic f(h, 0) for LS (h through
    the channel)."""
    h = channel(model.encoder(x), channel_noise, gen)  # [N, dh]
    if objective == "ls":
        return model.decoder.mean_input(h)
    z = torch.randn(len(x), model.decoder.dz, generator=gen)  # [N, dz]
    return model.decoder(h, z)  # [N, dy]


@torch.no_grad()
def _predictive_mean(model: Trained, objective: str, x: torch.Tensor, gen: torch.Generator,
                     channel_noise: float) -> torch.Tensor:
    """LS: f(h, 0) at one channel draw; cIMLE: the mean of MEAN_SAMPLES samples (channel and z)."""
    if objective == "ls":
        return _sample_model(model, objective, x, gen, channel_noise)
    return torch.stack([_sample_model(model, objective, x, gen, channel_noise)
                        for _ in range(MEAN_SAMPLES)]).mean(0)


def evaluate(model: Trained, task: ToyTask, s: float, objective: str, seed: int,
             settings: TrainSettings) -> dict[str, float]:
    """Every metric for one trained model, on data drawn from an evaluation stream of its own."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    test = task.sample(TEST_SIZE, s, gen, balanced=True)
    with torch.no_grad():
        test_loss = _objective_loss(objective, model.encoder, model.decoder, test.x, test.y, settings, gen, gen)
        mean_loss = least_squares(_predictive_mean(model, objective, test.x, gen, settings.channel_noise), test.y)
    energies, judged = [], []
    for c in range(task.config.n_classes):
        labels = torch.full((ENERGY_SAMPLES,), c, dtype=torch.long)
        aux = task.sample_aux(ENERGY_SAMPLES, gen)  # the same v for model and truth: p(y | c) over v
        model_y = _sample_model(model, objective, task.sample_x(labels, aux, gen), gen, settings.channel_noise)
        true_y = task.sample_y(labels, aux, s, gen)  # [n, dy]
        energies.append(energy_distance(model_y, true_y))
        judged.append(task.judge(model_y, aux, c, s))
    return {
        "test_loss": float(test_loss),
        "mean_pred_loss": float(mean_loss),
        "bayes_floor": task.bayes_floor(s),
        "probe_accuracy": _probe(model.encoder, task, s, seed, settings),
        "probe_accuracy_untrained": _probe(model.untrained_encoder, task, s, seed, settings),
        "energy_distance": float(torch.stack(energies).mean()),
        **{name: float(torch.stack([j[name] for j in judged]).mean()) for name in judged[0]},
    }


def run_grid(strengths: Sequence[float], seeds: Sequence[int], settings: TrainSettings,
             task: ToyTask | None = None, progress: bool = True) -> pd.DataFrame:
    """Train and evaluate every (s, seed, objective); return the tidy table."""
    task = task or ToyTask()
    jobs = [(s, seed, obj) for s in strengths for seed in seeds for obj in OBJECTIVES]
    rows = []
    bar = tqdm(jobs, desc="toy", disable=not (progress and interactive(sys.stderr)), file=sys.stderr)
    for i, (s, seed, obj) in enumerate(bar):
        bar.set_postfix_str(f"{obj} s={s:g} seed={seed}")
        start = time.perf_counter()
        model = train_one(task, s, obj, seed, settings)
        metrics = evaluate(model, task, s, obj, seed, settings)
        metrics["train_seconds"] = time.perf_counter() - start
        if progress and bar.disable:  # a log file: one plain line per model instead of a bar
            print(f"toy {i + 1}/{len(jobs)}: {obj} s={s:g} seed={seed} ({metrics['train_seconds']:.1f} s)", flush=True)
        base = {"objective": obj, "k": settings.k if obj == "cimle" else 1, "mask_strength": s, "seed": seed,
                "steps": settings.steps, "n_classes": task.config.n_classes, "dh": settings.dh, "dz": settings.dz,
                "channel_noise": settings.channel_noise}
        rows += [{**base, "metric": name, "value": value} for name, value in metrics.items()]
    return pd.DataFrame(rows)


# ---- reporting --------------------------------------------------------------

SUMMARY_METRICS = ("test_loss", "mean_pred_loss", "bayes_floor", "probe_accuracy", "probe_accuracy_untrained",
                   "energy_distance", "mode_accuracy", "axis_accuracy", "amplitude")


def summarize(frame: pd.DataFrame) -> str:
    """mean +- std over seeds, one row per (objective, s)."""
    frame = frame[frame.metric.isin(SUMMARY_METRICS)]
    stats = frame.groupby(["objective", "mask_strength", "metric"])["value"].agg(["mean", "std"])
    stats["cell"] = [f"{m:.3f} +- {0.0 if pd.isna(sd) else sd:.3f}" for m, sd in zip(stats["mean"], stats["std"])]
    table = stats["cell"].unstack("metric")[[m for m in SUMMARY_METRICS if m in set(frame.metric)]]
    n_seeds = frame.groupby(["objective", "mask_strength"]).seed.nunique().min()
    return f"mean +- std over {n_seeds} seed(s)\n" + table.to_string()


def acceptance(frame: pd.DataFrame) -> list[tuple[str, bool]]:
    """The toy's claims, checked on seed means; only for strengths present in the table."""
    mean = frame.groupby(["objective", "mask_strength", "metric"])["value"].mean()
    strengths = set(frame.mask_strength)
    checks = []
    if 1.0 in strengths:
        ls = lambda m: mean[("ls", 1.0, m)]  # noqa: E731
        ci = lambda m: mean[("cimle", 1.0, m)]  # noqa: E731
        gap = abs(ls("test_loss") - ls("bayes_floor")) / ls("bayes_floor")
        checks += [
            (f"s=1: LS test loss {ls('test_loss'):.4f} within 2% of floor {ls('bayes_floor'):.4f} "
             f"(gap {100 * gap:.2f}%)", gap <= 0.02),
            (f"s=1: LS probe {ls('probe_accuracy'):.3f} <= untrained {ls('probe_accuracy_untrained'):.3f} + 0.10",
             ls("probe_accuracy") <= ls("probe_accuracy_untrained") + 0.10),
            (f"s=1: cIMLE probe {ci('probe_accuracy'):.3f} >= 0.90", ci("probe_accuracy") >= 0.90),
        ]
        if ("cimle", 1.0, "axis_accuracy") in mean.index:
            k = int(frame.loc[frame.objective == "cimle", "k"].iloc[0])
            checks.append((f"s=1: cIMLE samples on their class's mode axis {ci('axis_accuracy'):.3f} >= 0.90 "
                           f"(LS {ls('axis_accuracy'):.3f}; chance {1 / frame.n_classes.iloc[0]:.2f}; at "
                           f"{ci('amplitude'):.2f} of the mode radius, nearest-of-{k}: "
                           f"{nearest_of_k_amplitude(k):.2f})", ci("axis_accuracy") >= 0.90))
    if 0.0 in strengths:
        for obj in OBJECTIVES:
            acc = mean[(obj, 0.0, "probe_accuracy")]
            checks.append((f"s=0: {obj} probe {acc:.3f} >= 0.90", acc >= 0.90))
    inner = sorted(s for s in strengths if 0.0 < s < 1.0)
    if {0.0, 1.0} <= strengths and len(inner) >= 2:
        # graded collapse: LS's probe falls through intermediate strengths, not at s = 1 only
        lo, hi = mean[("ls", 1.0, "probe_accuracy")], mean[("ls", 0.0, "probe_accuracy")]
        graded = [s for s in inner if hi - 0.05 >= mean[("ls", s, "probe_accuracy")] >= lo + 0.05]
        checks.append((f"graded: LS probe >= 0.05 away from both its s=0 ({hi:.3f}) and s=1 ({lo:.3f}) values at "
                       f"s = {graded} (need >= 2)", len(graded) >= 2))
        worst = min(mean[("cimle", s, "probe_accuracy")] for s in strengths)
        checks.append((f"cIMLE probe >= 0.90 at every s (lowest {worst:.3f})", worst >= 0.90))
    return checks


def report(frame: pd.DataFrame) -> str:
    lines = [summarize(frame), "", "acceptance:"]
    lines += [f"  [{'PASS' if ok else 'FAIL'}] {text}" for text, ok in acceptance(frame)]
    if len([s for s in set(frame.mask_strength) if 0.0 < s < 1.0]) < 2:
        lines.append("  (the graded collapse needs two strengths between 0 and 1: the full grid, make toy)")
    return "\n".join(lines) + "\n"


# ---- command line -----------------------------------------------------------

# the end strengths at the full grid's training length: every check but the graded collapse's, in about
# 90 s on one core (the graded collapse needs strengths between them)
QUICK = dict(strengths=[0.0, 1.0], seeds=2, steps=2000)
DEFAULT = dict(strengths=[0.0, 0.25, 0.5, 0.75, 0.9, 1.0], seeds=5, steps=2000)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends the default, except to flags and to options left None (their help states the default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:  # not "in": 0 == False
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # one line ``error: ...`` for a bad argument, as the study's commands (no usage block before it)
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=_DefaultsFormatter)
    p.add_argument("--quick", action="store_true", help=f"small grid: {QUICK}")
    p.add_argument("--strengths", type=float, nargs="+", help=f"mask strengths in [0, 1] (default {DEFAULT['strengths']})")
    p.add_argument("--seeds", type=int, help=f"number of seeds (default {DEFAULT['seeds']})")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are FIRST..FIRST+N-1 (fresh seeds: 5)")
    p.add_argument("--task-seed", type=int, default=ToyConfig.task_seed,
                   help="the task's own seed (rotation, means, mode axes): another task of the same kind")
    p.add_argument("--steps", type=int, help=f"training steps per run (default {DEFAULT['steps']})")
    p.add_argument("--k", type=int, default=TrainSettings.k, help="cIMLE samples per example")
    p.add_argument("--channel-noise", type=float, default=TrainSettings.channel_noise,
                   help="std of the representation channel's noise (0: a clean code, the knife-edge toy)")
    p.add_argument("--out", type=Path, default=Path("runs/toy"),
                   help="folder for the CSV and summary (make toy: results/toy)")
    p.add_argument("--figures", type=Path, default=None,
                   help="folder for the figure files (default: --out; make toy: figures)")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from the CSV in --out; no training")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    args = p.parse_args(argv)
    if args.figures is None:
        args.figures = args.out
    preset = QUICK if args.quick else DEFAULT
    for name in ("strengths", "seeds", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if any(not 0.0 <= s <= 1.0 for s in args.strengths):
        p.error(f"--strengths must lie in [0, 1], got {args.strengths}")
    if args.first_seed < 0 or args.task_seed < 0:
        p.error("--first-seed and --task-seed must be >= 0")
    if args.seeds < 1 or args.steps < 1 or args.k < 1:
        p.error("--seeds, --steps and --k must be >= 1")
    if args.channel_noise < 0:
        p.error(f"--channel-noise must be >= 0, got {args.channel_noise}")
    return args


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    with cpu_threads(args.threads):  # restored afterwards: callers in the same process keep their setting
        csv = args.out / CSV_NAME
        if args.plot_only:
            if not csv.exists():
                raise UserError(f"no toy results at {csv}: run the toy without --plot-only first, or point "
                                f"--out at the folder that holds {CSV_NAME}")
            frame = read_results(csv)
        else:
            for flag, folder in (("--out", args.out), ("--figures", args.figures)):
                try:  # now, not after the training
                    writable_folder(folder)
                except OSError as exc:
                    raise UserError(f"cannot write to {flag} {folder}: {exc.strerror or exc}") from None
            settings = TrainSettings(steps=args.steps, k=args.k, channel_noise=args.channel_noise)
            start = time.perf_counter()
            task = ToyTask(ToyConfig(task_seed=args.task_seed))
            seeds = list(range(args.first_seed, args.first_seed + args.seeds))
            frame = run_grid(args.strengths, seeds, settings, task=task, progress=not args.no_progress)
            write_results(csv, frame)
            text = report(frame) + f"\nsettings: {asdict(settings)}\ntask: {asdict(task.config)}\n"
            text += f"wall time: {time.perf_counter() - start:.1f} s\n"
            atomic_write_text(args.out / SUMMARY_NAME, text)
            print(text)
        paths = plot_toy(frame, args.figures)
        print("wrote", csv, *paths)
        return frame


def _cli(argv: Sequence[str] | None = None) -> int:
    """The script: 0, 1 when a run's own acceptance checks fail (so make stops), 2 for a user error."""
    args = parse_args(argv)

    def run() -> int:
        frame = main(argv)
        failed = [] if args.plot_only else [text for text, ok in acceptance(frame) if not ok]
        if failed:
            print(f"toy: {len(failed)} acceptance check(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0

    return run_command(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(_cli())
