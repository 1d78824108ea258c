"""Projected GPU cost of the poster's pretraining, from counted work rather than timed work.

    python experiments/gpu_cost.py [--configs A.yaml B.yaml] [--mfu 0.3 0.5] [--out results/gpu_cost.csv]

Per config (decoder) and objective: the FLOPs of one training step (forward + backward, the optimiser step
counts 0) per image, counted by the benchmark's ``step_flops`` on a CPU model at a small batch; then the hours of
the config's epochs on 1 and 8 GPUs at a stated model FLOPs utilisation (MFU) of a vendor's dense bf16 peak. No
GPU is needed: the hours are a projection to be checked against ``experiments/device_check.sh``'s measured rate.
Also the k-NN monitor's share of training: an encoder forward (all patches) per monitored image, every N epochs.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.bench.run import step_flops  # noqa: E402
from study.config import Config, load_config  # noqa: E402
from study.methods.model import build_model  # noqa: E402
from study.train.step import train_step, training_state  # noqa: E402
from study.utils.args import OneLineParser, positive_int  # noqa: E402
from study.utils.device import seed_everything  # noqa: E402
from study.utils.errors import run_parsed  # noqa: E402
from study.utils.io import atomic_write_text  # noqa: E402

CONFIGS = ("experiments/configs/in100-vit-t.yaml", "experiments/configs/in100-vit-t-lite.yaml")
OBJECTIVES = ("ls", "cimle", "mvae")
# vendor dense (no structured sparsity) bf16 tensor-core peaks, FLOP/s: NVIDIA's H100 SXM and A100 datasheets
# list 1,979 and 624 TFLOP/s "with sparsity", twice the dense figures used here
PEAKS = {"H100 SXM": 989e12, "A100": 312e12}
IN100_TRAIN_IMAGES = 126_689
# counting runs the model on the CPU in fp32: FLOPs do not depend on the device or the precision
CPU = ["device=cpu", "precision=fp32"]
FIELDS = ("config", "decoder", "objective", "k", "noise_block", "item", "every_epochs", "flops_per_image",
          "images", "flops", "share_of_training", "gpu", "peak_tflops", "mfu", "gpus", "wall_hours", "gpu_hours",
          "images_per_s")


def _fraction(text: str) -> float:
    """An argparse type: a utilisation in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (0.3 = 30% of the peak), got {text}")
    return value


def _images(cfg: Config, batch: int) -> torch.Tensor:
    m = cfg.model
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(batch, m.in_chans, m.img_size, m.img_size, generator=gen)  # [B, C, H, W]


def step_flops_per_image(cfg: Config, batch: int = 2) -> float:
    """FLOPs per image of one training step of ``cfg`` (its objective, k and noise placement): the training loop's
    own step (mask, forward, backward, AdamW) on ``batch`` random images, counted once and divided by ``batch``."""
    seed_everything(cfg.seed)
    device = torch.device("cpu")
    state = training_state(cfg, build_model(cfg).to(device), device)
    state.model.train()
    imgs = _images(cfg, batch)
    return step_flops(lambda: train_step(state, imgs)) / batch


def encoder_flops_per_image(cfg: Config, batch: int = 2) -> float:
    """FLOPs per image of the encoder's forward on every patch (what k-NN features cost), in eval mode."""
    seed_everything(cfg.seed)
    model = build_model(cfg).eval()
    imgs = _images(cfg, batch)
    with torch.no_grad():
        return step_flops(lambda: model.encoder.features(imgs)) / batch


def images_per_epoch(cfg: Config, train_images: int) -> int:
    """The images of an epoch's optimiser steps: whole effective batches (every process drops its last part)."""
    batch = cfg.optim.effective_batch or cfg.optim.batch_size * cfg.optim.accum_steps
    return train_images // batch * batch


def project_hours(flops: float, peak: float, mfu: float, gpus: int) -> tuple[float, float]:
    """(wall-clock hours, GPU-hours) of ``flops`` on ``gpus`` GPUs, each doing ``mfu`` x ``peak`` FLOP/s."""
    wall = flops / (gpus * peak * mfu) / 3600
    return wall, wall * gpus


def _decoder(cfg: Config) -> str:
    return f"{cfg.model.decoder_dim}x{cfg.model.decoder_depth}"


def training_rows(path: str, overrides: list[str], args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    """One row per objective x GPU x MFU x GPU count for the config at ``path``; and each objective's run FLOPs."""
    rows, run_flops = [], {}
    for objective in OBJECTIVES:
        cfg = load_config(path, [*CPU, f"objective={objective}", *overrides])
        per_image = step_flops_per_image(cfg, args.batch)
        images = images_per_epoch(cfg, args.train_images) * cfg.epochs
        run_flops[objective] = per_image * images
        base = {"config": Path(path).stem, "decoder": _decoder(cfg), "objective": objective,
                "k": cfg.cimle.k if objective == "cimle" else None,
                "noise_block": cfg.noise.block if objective != "ls" else None, "item": "train",
                "flops_per_image": per_image, "images": images, "flops": run_flops[objective]}
        for gpu, peak in PEAKS.items():
            for mfu in args.mfu:
                for gpus in args.gpus:
                    wall, gpu_hours = project_hours(run_flops[objective], peak, mfu, gpus)
                    rows.append({**base, "gpu": gpu, "peak_tflops": peak / 1e12, "mfu": mfu, "gpus": gpus,
                                 "wall_hours": wall, "gpu_hours": gpu_hours,
                                 # what the input pipeline must deliver for the GPUs to keep this pace
                                 "images_per_s": images / (wall * 3600)})
    return rows, run_flops


def monitor_rows(path: str, overrides: list[str], run_flops: dict[str, float], args: argparse.Namespace) -> list[dict]:
    """The k-NN monitor every N epochs, as a share of each objective's training FLOPs: per monitoring, an encoder
    forward of the fixed train and val subsets plus the val x train similarity matmul (the k-NN itself)."""
    cfg = load_config(path, [*CPU, *overrides])
    per_image = encoder_flops_per_image(cfg, args.batch)
    images = args.monitor_train + args.monitor_val
    knn = 2.0 * args.monitor_val * args.monitor_train * cfg.model.embed_dim  # [val, D] @ [D, train]
    once, rows = per_image * images + knn, []
    for every in args.monitor_every:
        times = cfg.epochs // every
        for objective, train in run_flops.items():
            # one monitoring against the N epochs of training before it
            share = once / (train / cfg.epochs * every)
            rows.append({"config": Path(path).stem, "decoder": _decoder(cfg), "objective": objective,
                         "item": "knn_monitor", "every_epochs": every, "flops_per_image": per_image,
                         "images": images * times, "flops": once * times, "share_of_training": share})
    return rows


def cost_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for path in args.configs:
        train, run_flops = training_rows(path, args.overrides, args)
        rows += train + monitor_rows(path, args.overrides, run_flops, args)
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _hours(h: float) -> str:
    return f"{h:.0f} h" if h >= 10 else f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min"


def _label(row: dict) -> str:
    return f"cimle k={row['k']}" if row["objective"] == "cimle" else row["objective"]


def format_table(rows: list[dict]) -> str:
    """Markdown: per config and objective, GFLOPs per image, EFLOPs per run and the run's wall-clock time per GPU,
    GPU count and MFU; then, per config, the k-NN monitor's share of each objective's training FLOPs."""
    train = [r for r in rows if r["item"] == "train"]
    cols = sorted({(r["gpu"], r["gpus"], r["mfu"]) for r in train}, key=lambda c: (-PEAKS.get(c[0], 0), c[1], c[2]))
    head = ["config", "decoder", "objective", "GFLOPs/image", "EFLOPs/run"] + [f"{g} x{n} @{m:.0%}" for g, n, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, objective in dict.fromkeys((r["config"], r["objective"]) for r in train):
        mine = {(r["gpu"], r["gpus"], r["mfu"]): r for r in train
                if (r["config"], r["objective"]) == (config, objective)}
        first = next(iter(mine.values()))
        cells = [config, first["decoder"], _label(first), f"{first['flops_per_image'] / 1e9:.1f}",
                 f"{first['flops'] / 1e18:.2f}"] + [_hours(mine[c]["wall_hours"]) if c in mine else "" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    monitor = [r for r in rows if r["item"] == "knn_monitor"]
    for config in dict.fromkeys(r["config"] for r in monitor):
        mine = [r for r in monitor if r["config"] == config]
        shares = "; ".join(f"every {n} epochs: " + ", ".join(f"{r['objective']} {r['share_of_training']:.2%}"
                                                            for r in mine if r["every_epochs"] == n)
                           for n in dict.fromkeys(r["every_epochs"] for r in mine))
        lines.append(f"\nk-NN monitor, {config} ({mine[0]['decoder']} decoder), share of training FLOPs: {shares} "
                     f"(encoder forward {mine[0]['flops_per_image'] / 1e9:.2f} GFLOPs/image)")
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="experiments/gpu_cost.py", description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help="configs to cost (default: the two in100)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every config (after device=cpu precision=fp32)")
    p.add_argument("--batch", type=positive_int, default=2, help="images per counted step (FLOPs are per image)")
    p.add_argument("--train-images", type=positive_int, default=IN100_TRAIN_IMAGES,
                   help="training images an epoch reads (ImageNet-100: 126,689)")
    p.add_argument("--mfu", type=_fraction, nargs="+", default=[0.3, 0.5], help="model FLOPs utilisations")
    p.add_argument("--gpus", type=positive_int, nargs="+", default=[1, 8], help="GPU counts")
    p.add_argument("--monitor-every", type=positive_int, nargs="+", default=[10, 20], help="k-NN monitor period")
    p.add_argument("--monitor-train", type=positive_int, default=10_000, help="k-NN monitor's labelled train images")
    p.add_argument("--monitor-val", type=positive_int, default=5_000, help="k-NN monitor's val images")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_cost.csv",
                   help="CSV to write; the printed table goes beside it as .md")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    rows = cost_rows(args)
    table = format_table(rows)
    print(table)
    atomic_write_text(args.out, to_csv(rows))
    # the table beside the CSV, so that a page quoting it can be checked against the run that made it
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
