"""The command's arguments and the settings of a run at one precision, checked before any work."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from study.config import Config, with_overrides
from study.utils.args import OneLineParser, nonnegative_int, positive_int
from study.utils.device import resolve_device
from study.utils.errors import UserError

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
                      description="time training steps: LS, cIMLE at each k, the Masked VAE")
    p.add_argument("--config", default=None, help="YAML file, e.g. experiments/configs/cpu-small.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set noise.block=head: the cIMLE rows' noise placement, "
                   "LS on the same model (repeatable)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--precision", type=_names, help="precisions timed in the same rounds (default: the config's)")
    p.add_argument("--k", type=int_list, default=[1, 2, 4, 8, 16], help="cIMLE k values (default 1,2,4,8,16)")
    p.add_argument("--batch", type=positive_int, help="images per step (default: optim.batch_size)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed rounds first")
    p.add_argument("--out", help="JSON file to write (atomically)")
    p.add_argument("--selection-k", type=int_list, default=[4, 8, 16], help="k of the selection-memory grid")
    p.add_argument("--selection-chunk", type=int_list, default=[1, 2, 4, 8], help="chunks of that grid")
    p.add_argument("--no-selection-timing", action="store_true", help="do not time the selection alone")
    return p


@dataclass(frozen=True)
class Plan:
    """A run at one precision; ``args.k`` is sorted."""

    cfg: Config
    device: torch.device
    args: argparse.Namespace

    @property
    def batch(self) -> int:
        return self.cfg.optim.batch_size


def make_plans(cfg: Config, args: argparse.Namespace) -> list[Plan]:
    device = resolve_device(cfg.device)
    precisions = list(dict.fromkeys(args.precision or [cfg.precision]))
    if set(precisions) - {"fp32", "bf16", "fp16"}:
        raise UserError(f"--precision must list some of fp32, bf16, fp16, got {','.join(precisions)}")
    if "fp16" in precisions and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; use fp32 and/or bf16 on CPU")
    # every step is a whole optimizer step at the bench's batch, whatever accumulation the config asks for
    cfg = with_overrides(cfg, "compile=false", f"optim.batch_size={args.batch or cfg.optim.batch_size}",
                         "optim.accum_steps=1", "optim.effective_batch=null")
    return [Plan(with_overrides(cfg, f"precision={p}"), device, args) for p in precisions]
