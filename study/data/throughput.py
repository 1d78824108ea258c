"""How many CPU cores each input pipeline needs to feed a GPU, measured on the images at hand.

``python -m study bench-data`` times, on the same images and one thread each, the
folder pipeline (decode and MAE's PIL transform: one loader worker's work), the
packed one (a gather from the memory-mapped store) and the packed batches' crops on
``--device``, and turns ``--rate`` (default 69,000 images/s: 8 H100-class GPUs
training ViT-T LS at 30% of their bf16 peak) into cores. The pack is read warm
from the page cache, as on a node whose memory holds it; a network disk is slower.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from study.utils.args import int_at_least, positive_float, positive_int
from study.config import load_config
from study.utils.console import duration
from study.utils.errors import UserError
from study.data.image_folders import RobustImageFolder, train_transform
from study.utils.io import atomic_write_text
from study.data.packed import DeviceCrops, PackedImages, pack_folder
from study.utils.device import host_cpu

__all__ = ["add_arguments", "run_from_args", "bench_data"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=positive_int, default=512,
                   help="images of the training split to time (default 512)")
    p.add_argument("--batch", type=positive_int, default=256, help="batch of the packed pipeline (default 256)")
    p.add_argument("--size", type=int_at_least(16), default=256, help="side of the packed images (default 256)")
    p.add_argument("--rate", type=positive_float, default=69_000.0,
                   help="images/s the GPUs consume, for the cores needed (default 69000: 8 GPUs, ViT-T LS)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the packed crops run (default auto)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")


def _rate(fn, n: int, min_seconds: float = 1.0) -> float:
    """Images/s of ``fn()`` (which handles ``n`` images), repeated for at least ``min_seconds`` after a warm-up."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return calls * n / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_data(folder: RobustImageFolder, img_size: int, *, images: int, batch: int, size: int, rate: float,
               device: torch.device) -> dict:
    n = min(images, len(folder))
    if n < 1:
        raise UserError(f"{folder.root} holds no images to time")
    batch = min(batch, n)
    subset = folder.subset(list(range(0, len(folder), max(1, len(folder) // n)))[:n], train_transform(img_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: what one data-loader worker does
    try:
        torch.manual_seed(0)
        folder_rate = _rate(lambda: [subset[i] for i in range(n)], n)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pack = pack_folder(subset, Path(tmp) / "pack", size, progress=False)
            pack_rate = n / (time.perf_counter() - t0)
            packed = PackedImages(pack, img_size)
            order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(0))
            batches = [order[i:i + batch].tolist() for i in range(0, n - batch + 1, batch)]
            gather_rate = _rate(lambda: [packed[b] for b in batches], len(batches) * batch)
            (pixels, sizes), _ = packed[batches[0]]
    finally:
        torch.set_num_threads(threads)
    crops = DeviceCrops(img_size)
    gen = torch.Generator(device=device).manual_seed(0)
    on_device = (pixels.to(device), sizes.to(device))
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        crop_rate = _rate(lambda: (crops(on_device, gen), _sync(device)), batch)
    finally:
        torch.set_num_threads(threads)
    packed_cpu = gather_rate if device.type == "cuda" else 1 / (1 / gather_rate + 1 / crop_rate)
    cpu = host_cpu()["model_name"]
    return {
        "images": n, "batch": batch, "img_size": img_size, "pack_size": size, "rate_needed": rate,
        "folder_images_per_s_per_core": folder_rate,
        "packed_gather_images_per_s_per_core": gather_rate,
        "crops_images_per_s": crop_rate, "crops_device": str(device),
        "packed_images_per_s_per_core": packed_cpu,
        "packed_over_folder_per_core": packed_cpu / folder_rate,
        "folder_cores_needed": rate / folder_rate,
        "packed_cores_needed": rate / packed_cpu,
        "gpu_share_for_crops": rate / crop_rate if device.type == "cuda" else None,
        "pack_images_per_s_per_core": pack_rate,
        "host": {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu},
        "source": str(folder.root),
    }


def _print(r: dict) -> None:
    print(f"host: {r['host']['cpu']} ({r['host']['cpu_count']} cores), torch {r['host']['torch']}; "
          f"{r['images']} images of {r['source']}, model input {r['img_size']} px, pack {r['pack_size']} px")
    print(f"{'pipeline':<44}{'images/s per core':>18}{'cores for ' + format(r['rate_needed'], ',.0f') + '/s':>20}")
    print(f"{'folder (PIL decode + crop + flip)':<44}{r['folder_images_per_s_per_core']:>18,.0f}"
          f"{r['folder_cores_needed']:>20,.1f}")
    where = "on the GPU" if r["crops_device"].startswith("cuda") else "on this CPU"
    print(f"{'packed (gather' + (' + crops' if where == 'on this CPU' else '') + ')':<44}"
          f"{r['packed_images_per_s_per_core']:>18,.0f}{r['packed_cores_needed']:>20,.1f}")
    print(f"  of which the gather from the store: {r['packed_gather_images_per_s_per_core']:,.0f} images/s per core; "
          f"crops {where} ({r['crops_device']}): {r['crops_images_per_s']:,.0f} images/s")
    if r["gpu_share_for_crops"] is not None:
        print(f"  the crops take {100 * r['gpu_share_for_crops'] / 8:.1f}% of each of 8 GPUs at that rate")
    print(f"packed / folder, per core: {r['packed_over_folder_per_core']:.1f}x; packing costs "
          f"{r['pack_images_per_s_per_core']:,.0f} images/s per core, once "
          f"(126,689 ImageNet-100 images: {duration(126_689 / r['pack_images_per_s_per_core'])} on one core)")


def run_from_args(args: argparse.Namespace) -> int:
    from study.data.datasets import build_eval_datasets
    from study.utils.device import resolve_device

    cfg = load_config(args.config, args.overrides)
    if cfg.data.name not in ("imagefolder", "imagenet100"):
        raise UserError(f"bench-data times image folders; data.name={cfg.data.name!r} is held in memory "
                        "(use --config experiments/configs/in100-vit-t.yaml or --set data.name=imagefolder)")
    train, _ = build_eval_datasets(cfg)
    result = bench_data(train, cfg.model.img_size, images=args.images, batch=args.batch, size=args.size,
                        rate=args.rate, device=resolve_device(args.device))
    _print(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return 0
