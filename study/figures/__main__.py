"""Every figure of the study, redrawn from the stored results (no training): ``make figures``.

Each figure reads a committed table under ``--results`` (written by ``make toy``,
``make experiments``, ``make experiments-synthetic``, ``make k-axis`` and
``make training-length``) or a small committed checkpoint under
``results/checkpoints`` (``make completions``,
``experiments/synthetic_completion.py --checkpoints``); the masks figure draws from
the mask generators. A figure whose stored results are missing is reported and
skipped (exit status 1 at the end), so one missing table does not hide the others;
one whose table is broken by a hand edit likewise, naming its line (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from study.figures import completions, studies, synthetic, synthetic_axes
from study.figures.headline import write_headline
from study.figures.k_axis import write_k_axis
from study.figures.masks import plot_mask_examples
from study.figures.toy import plot_toy
from study.figures.training_length import write_training_length
from study.figures.mean_erased import write_mean_erased
from study.evaluation.results import ResultsTableError, read_results
from study.utils.device import cpu_threads
from study.utils.errors import one_line

STUDIES = {
    "mask_strength_cpu": "mask_strength",
    "mask_strength_cpu_paired": "paired_difference",
    "efficiency_cpu": "efficiency",
    "noise_block_cpu": "noise_block",
}
SYNTHETIC = {  # same-mean synthetic images: figure -> its axis, all from results/synthetic_cpu.csv
    "synthetic_cpu": "synthetic_mean_shift",
    "synthetic_ratio_cpu": "mask_ratio",
    "synthetic_tradeoff": "tradeoff",
}


def _toy(results: Path, out: Path) -> list[Path]:
    return plot_toy(read_results(results / "toy" / "toy_results.csv"), out)


def _masks(results: Path, out: Path) -> list[Path]:
    return plot_mask_examples(out)


def _study(sweep: str, kind: str) -> Callable[[Path, Path], list[Path]]:
    def draw(results: Path, out: Path) -> list[Path]:
        table = read_results(results / f"{sweep.removesuffix('_paired')}.csv")
        return getattr(studies, f"{kind}_figure")(table, out, name=sweep)

    return draw


def _synthetic(name: str, kind: str) -> Callable[[Path, Path], list[Path]]:
    def draw(results: Path, out: Path) -> list[Path]:
        table = read_results(results / "synthetic_cpu.csv")
        if kind == "tradeoff":
            return synthetic.tradeoff_figure(table, out, name=name)
        return synthetic.synthetic_figure(table, out, name=name, axis=kind)

    return draw


def _synthetic_class_axis(results: Path, out: Path) -> list[Path]:
    """LS's mean beside per-token cIMLE's samples, on the class axis of the same-mean synthetic images."""
    checkpoints = [results / "checkpoints" / f"synthetic_hidden_{obj}.pt" for obj in ("ls", "cimle_token")]
    missing = [str(p) for p in checkpoints if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {', '.join(missing)}")
    with cpu_threads(1):
        return synthetic_axes.redraw(checkpoints, out)


def _mnist_completions(results: Path, out: Path) -> list[Path]:
    """Every objective's completions of real digits at ratio 0.9, with their diversity against the data's."""
    checkpoints = [results / "checkpoints" / f"mnist_{v}.pt" for v in ("ls", "cimle_token", "cimle_image", "mvae")]
    missing = [str(p) for p in checkpoints if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {', '.join(missing)} (make completions)")
    with cpu_threads(1):
        return completions.redraw(checkpoints, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="folder of stored results (default: results)")
    # the committed figures/ is written only when asked for by name (make figures)
    parser.add_argument("--out", default="runs/figures",
                        help="folder for PNG + PDF files (default: runs/figures; make figures: figures)")
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    jobs: dict[str, Callable[[Path, Path], list[Path]]] = {"toy": _toy, "masks": _masks}
    jobs.update({sweep: _study(sweep, kind) for sweep, kind in STUDIES.items()})
    jobs.update({name: _synthetic(name, kind) for name, kind in SYNTHETIC.items()})
    jobs["synthetic_class_axis"] = _synthetic_class_axis
    jobs["mnist_completions"] = _mnist_completions
    jobs["k_axis"] = write_k_axis
    jobs["training_length"] = write_training_length
    jobs["mean_erased"] = write_mean_erased
    jobs["headline"] = write_headline
    skipped, broken = [], []
    for name, draw in jobs.items():
        start = time.perf_counter()
        try:
            paths = draw(results, out)
        except FileNotFoundError as exc:
            skipped.append(name)
            print(f"{name:20s} SKIPPED: {exc}", file=sys.stderr)
            continue
        except ResultsTableError as exc:  # a results table edited by hand: its line, not a traceback
            broken.append(name)
            print(f"{name:20s} FAILED: {one_line(exc)}", file=sys.stderr)
            continue
        print(f"{name:20s} {time.perf_counter() - start:5.1f} s  " + " ".join(str(p) for p in paths))
    if skipped:
        print(f"skipped {len(skipped)} figure(s) for lack of stored results: {', '.join(skipped)} "
              "(toy: make toy; studies: make experiments; k axis: make k-axis; training length: make training-length;"
              " completions: make completions; mean-erased digits: make mean-erased)",
              file=sys.stderr)
    if broken:
        print(f"error: {len(broken)} figure(s) not drawn, their results table is broken: {', '.join(broken)} "
              "(fix the line named above)", file=sys.stderr)
        return 2
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
