"""The ``python -m experiments.bench`` command: its arguments, and the run that prints the table and writes the JSON."""

from __future__ import annotations

import argparse
import json
import sys

from experiments.bench.flops import PEAK_SHAPES
from experiments.bench.run import run_bench
from experiments.bench.settings import DEFAULT_KS, DEFAULT_SELECTION_CHUNKS, DEFAULT_SELECTION_KS
from experiments.bench.table import format_table
from study.cli_args import OneLineParser, nonnegative_int, positive_int
from study.config import load_config
from study.errors import run_command
from study.io import atomic_write_text

__all__ = ["build_parser", "main"]


def _int_list(text: str, minimum: int = 1) -> list[int]:
    """Comma-separated integers, each at least ``minimum`` (an argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= {minimum}, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    """Comma-separated names (checked by the bench's settings, which give the one-line error)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _block(text: str) -> int | str:
    """A decoder block index or ``head`` (an argparse type; the range is checked by the settings)."""
    text = text.strip()
    try:
        return text if text == "head" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block index or 'head', got {text!r}") from None


def _block_list(text: str) -> list[int | str]:
    return [_block(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m experiments.bench",
                      description="time training steps: LS, cIMLE at each k, the Masked VAE, transformers' ViTMAE")
    p.add_argument("--config", default=None, help="YAML file, e.g. experiments/configs/cpu-small.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set noise.block=head (repeatable)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--precision", type=_name_list, default=None,
                   help="precisions to time in the same rounds, e.g. fp32,bf16 (default: the config's); "
                        "transformers' model runs at each")
    p.add_argument("--k", type=_int_list, default=list(DEFAULT_KS), help="cIMLE k values (default 1,2,4,8,16)")
    p.add_argument("--batch", type=positive_int, default=None, help="images per step (default: optim.batch_size)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps per variant first")
    p.add_argument("--out", default=None, help="JSON file to write (atomically)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' ViTMAEForPreTraining")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (falls back to eager on error)")
    p.add_argument("--selection-k", type=_int_list, default=list(DEFAULT_SELECTION_KS),
                   help="k values of the selection-memory grid (default 4,8,16)")
    p.add_argument("--selection-chunk", type=_int_list, default=list(DEFAULT_SELECTION_CHUNKS),
                   help="chunk values of the selection-memory grid (default 1,2,4,8)")
    p.add_argument("--late-k", type=positive_int, default=8, help="k of the late-noise rows (default 8)")
    p.add_argument("--late-blocks", type=_block_list, default=None,
                   help="noise blocks of the late-noise rows, indices or 'head' "
                        "(default: 0, decoder_depth - 1 and head)")
    p.add_argument("--no-late-noise", action="store_true", help="skip the late-noise rows")
    p.add_argument("--selection-block", type=_block, default=None,
                   help="noise block of the selection-memory grid (default: the config's noise.block)")
    p.add_argument("--no-selection-timing", action="store_true",
                   help="do not time the selection alone at the largest k (saves (k+1) D_f per round)")
    p.add_argument("--peak-shapes", type=_shape_list, default=list(PEAK_SHAPES),
                   help="matmul shapes MxKxN,... of the peak-throughput measure (default "
                        + ",".join("x".join(map(str, s)) for s in PEAK_SHAPES) + "; smaller ones finish sooner on a "
                        "CPU without fast bf16, and read lower)")
    return p


def _shape_list(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 256x256x256,512x512x512, got {text!r}")
    return shapes


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a mistake in the flags (one line already printed), or --help
        return exc.code if isinstance(exc.code, int) else 2
    return run_command(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        res = run_bench(cfg, precisions=args.precision, ks=args.k, batch=args.batch, steps=args.steps, warmup=args.warmup,
                        transformers=not args.no_transformers, compile_models=args.compile,
                        selection_ks=args.selection_k, selection_chunks=args.selection_chunk,
                        late_noise=not args.no_late_noise, late_k=args.late_k, late_blocks=args.late_blocks,
                        selection_block=args.selection_block, selection_timing=not args.no_selection_timing,
                        config_path=args.config, peak_shapes=args.peak_shapes)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(res))
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
