"""The command's arguments and the settings of a run at one precision, checked before any work."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from study.config import Config
from study.utils.args import OneLineParser, nonnegative_int, positive_int
from study.utils.device import resolve_device
from study.utils.errors import UserError

Block = int | str  # a decoder block index, or "head": the token-wise head after the last attention


def int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m experiments.bench",
                      description="time training steps: LS, cIMLE at each k, the Masked VAE, transformers' ViTMAE")
    p.add_argument("--config", default=None, help="YAML file, e.g. experiments/configs/cpu-small.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set noise.block=head (repeatable)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--precision", type=_names, help="precisions timed in the same rounds (default: the config's)")
    p.add_argument("--k", type=int_list, default=[1, 2, 4, 8, 16], help="cIMLE k values (default 1,2,4,8,16)")
    p.add_argument("--batch", type=positive_int, help="images per step (default: optim.batch_size)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed rounds first")
    p.add_argument("--out", help="JSON file to write (atomically)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' ViTMAEForPreTraining")
    p.add_argument("--late-blocks", type=_names, help="noise blocks of the late-noise rows (cIMLE at the largest k): "
                   "indices or 'head' (default: 0, decoder_depth - 1 and head)")
    p.add_argument("--no-late-noise", action="store_true", help="skip the late-noise rows")
    p.add_argument("--selection-k", type=int_list, default=[4, 8, 16], help="k of the selection-memory grid")
    p.add_argument("--selection-chunk", type=int_list, default=[1, 2, 4, 8], help="chunks of that grid")
    p.add_argument("--no-selection-timing", action="store_true", help="do not time the selection alone")
    return p


@dataclass(frozen=True)
class Plan:
    """A run at one precision; ``args.k`` is sorted, its largest the k of the late-noise rows."""

    cfg: Config
    device: torch.device
    late: list[Block]
    args: argparse.Namespace

    @property
    def batch(self) -> int:
        return self.cfg.optim.batch_size


def with_changes(cfg: Config, **sections) -> Config:
    """``with_changes(cfg, objective="ls", noise={"block": 3})``: a copy with those fields replaced."""
    top = {k: v for k, v in sections.items() if not isinstance(v, dict)}
    nested = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items() if isinstance(v, dict)}
    return dataclasses.replace(cfg, **top, **nested)


def block_order(block: Block) -> tuple[int, int]:
    return (1, 0) if block == "head" else (0, int(block))


def make_plans(cfg: Config, args: argparse.Namespace) -> list[Plan]:
    device = resolve_device(cfg.device)
    precisions = list(dict.fromkeys(args.precision or [cfg.precision]))
    if set(precisions) - {"fp32", "bf16", "fp16"}:
        raise UserError(f"--precision must list some of fp32, bf16, fp16, got {','.join(precisions)}")
    if "fp16" in precisions and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; use fp32 and/or bf16 on CPU")
    # every step is a whole optimizer step at the bench's batch, whatever accumulation the config asks for
    cfg = with_changes(cfg, compile=False, optim={"batch_size": args.batch or cfg.optim.batch_size,
                                                  "accum_steps": 1, "effective_batch": None})
    depth, late = cfg.model.decoder_depth, []
    for text in [] if args.no_late_noise else args.late_blocks or ["0", str(depth - 1), "head"]:
        block = text if text == "head" else int(text) if text.isdigit() else -1
        if block != "head" and not 0 <= block <= depth:
            raise UserError(f"late noise blocks must be 'head' or in [0, decoder_depth={depth}], got {text}")
        if block not in late:
            late.append(block)
    return [Plan(with_changes(cfg, precision=p), device, sorted(late, key=block_order), args) for p in precisions]
