"""A fake ImageNet-1k tree, shaped like the real one, for rehearsals and tests.

    python -m study.data.fake_imagenet --out DIR [--synsets 104] [--train-per-class 12] [--val-per-class 4] [--seed 0]

writes ``DIR/train/<wnid>/<wnid>_<i>.JPEG``, a flat ``DIR/val/ILSVRC2012_val_<8 digits>.JPEG``
(classes interleaved, as in the real val) and Kaggle's ``DIR/LOC_val_solution.csv``
(``--val-folders`` writes ``DIR/val/<wnid>/`` instead, the layout after valprep.sh).
The synsets are the ImageNet-100 list followed by real ImageNet-1k wnids that
are not in it, so the default 104 exercise both the chosen and the ignored
classes of ``build-in100``. Each class has its own colours, stripe direction
and frequency and blob size; each image adds a random size and aspect, phase,
blob position, brightness and noise, so the classes are told apart by
features but not by any single pixel. Output is a function of the arguments.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from study.utils.args import OneLineParser, nonnegative_int, positive_int
from study.utils.console import duration, interactive
from study.utils.errors import UserError, run_command
from study.data.imagenet100 import imagenet100_classes

__all__ = ["EXTRA_WNIDS", "fake_wnids", "make_fake_imagenet", "main"]

# real ImageNet-1k classes (tench, goldfish, sharks, rays, cock) outside the ImageNet-100 list
EXTRA_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361",
               "n01494475", "n01496331", "n01498041", "n01514668")
_TRAIN, _VAL = 1, 2  # seed words that keep the two splits' images apart


def fake_wnids(n: int) -> list[str]:
    """The first ``n`` of: the ImageNet-100 list, then :data:`EXTRA_WNIDS`."""
    pool = imagenet100_classes() + list(EXTRA_WNIDS)
    if not 1 <= n <= len(pool):
        raise UserError(f"--synsets must be between 1 and {len(pool)} (the ImageNet-100 list plus "
                        f"{len(EXTRA_WNIDS)} others), got {n}")
    return pool[:n]


@dataclass(frozen=True)
class _Style:
    colours: np.ndarray  # (3, 3) float32: background, stripes, blob
    direction: tuple[float, float]
    frequency: float  # stripe cycles per short side
    blob: float  # blob radius as a fraction of the short side


def _style(wnid: str, seed: int) -> _Style:
    rng = np.random.default_rng([seed, int(wnid[1:])])
    angle = rng.uniform(0, np.pi)
    return _Style(rng.uniform(20, 235, (3, 3)).astype(np.float32), (float(np.cos(angle)), float(np.sin(angle))),
                  float(rng.uniform(2, 9)), float(rng.uniform(0.1, 0.3)))


_COARSE = 4  # the pattern is drawn at 1/4 of the size and scaled up: the cost of an image is its JPEG encoding
_NOISE = np.random.default_rng(12345).normal(0, 12, (1024, 1024, 3)).astype(np.int16)  # cropped per image


def _render(style: _Style, rng: np.random.Generator, sides: tuple[int, int]) -> tuple[Image.Image, tuple]:
    """One image and its blob's box ``(x0, y0, x1, y1)``."""
    h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
    s = min(h, w)
    ch, cw = -(-h // _COARSE), -(-w // _COARSE)
    ys = (np.arange(ch, dtype=np.float32) * (h / ch / s))[:, None]
    xs = (np.arange(cw, dtype=np.float32) * (w / cw / s))[None, :]
    dx, dy = style.direction
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * style.frequency * (xs * dx + ys * dy) + rng.uniform(0, 2 * np.pi))
    cy, cx = rng.uniform(0.25, 0.75) * h / s, rng.uniform(0.25, 0.75) * w / s
    radius = style.blob * rng.uniform(0.8, 1.25)
    blob = ((ys - cy) ** 2 + (xs - cx) ** 2 < radius ** 2).astype(np.float32)
    bg, fg, spot = style.colours
    coarse = bg + stripes[..., None] * (fg - bg)
    coarse += blob[..., None] * (spot - coarse)
    coarse *= rng.uniform(0.8, 1.2)
    image = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    oy, ox = (int(v) for v in rng.integers(0, 1024 - sides[1], 2)) if sides[1] < 1024 else (0, 0)
    noisy = np.asarray(image, dtype=np.int16) + _noise(h, w, oy, ox)
    box = tuple(int(np.clip(v * s, 0, lim - 1)) for v, lim in
                ((cx - radius, w), (cy - radius, h), (cx + radius, w), (cy + radius, h)))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), box


def _noise(h: int, w: int, oy: int, ox: int) -> np.ndarray:
    if h + oy <= _NOISE.shape[0] and w + ox <= _NOISE.shape[1]:
        return _NOISE[oy:oy + h, ox:ox + w]
    return np.resize(_NOISE, (h, w, 3))  # sides beyond the tile repeat it


def _save(image: Image.Image, path: Path) -> None:
    image.save(path, "JPEG", quality=85)


def _prepare_out(out: Path, overwrite: bool) -> None:
    ours = [out / "train", out / "val", out / "LOC_val_solution.csv"]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if any(p.exists() for p in ours):
        if not overwrite:
            raise UserError(f"{out} already holds a tree; choose another --out or pass --overwrite")
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def make_fake_imagenet(out: str | Path, synsets: int = 104, train_per_class: int = 12, val_per_class: int = 4,
                       seed: int = 0, *, sides: tuple[int, int] = (300, 500), val_folders: bool = False,
                       overwrite: bool = False, progress: bool = False) -> dict[str, int]:
    """Write the tree (see the module doc) and return ``{"train": n, "val": m}``."""
    from tqdm.auto import tqdm

    if train_per_class < 0 or val_per_class < 0:
        raise UserError("--train-per-class and --val-per-class must be >= 0")
    if not 8 <= sides[0] <= sides[1]:
        raise UserError(f"image sides must satisfy 8 <= min <= max, got {sides[0]}..{sides[1]}")
    out = Path(out).expanduser()
    wnids = fake_wnids(synsets)
    _prepare_out(out, overwrite)
    styles = {w: _style(w, seed) for w in wnids}
    # the val images of all classes share one numbering, shuffled so the classes interleave
    val_items = [(w, i) for w in wnids for i in range(val_per_class)]
    order = np.random.default_rng([seed, _VAL]).permutation(len(val_items))
    total = len(wnids) * train_per_class + len(val_items)
    with tqdm(total=total, desc="fake imagenet", unit="img", disable=not (progress and interactive())) as bar:
        for w in wnids:
            (out / "train" / w).mkdir(parents=True)
            for i in range(train_per_class):
                image, _ = _render(styles[w], np.random.default_rng([seed, _TRAIN, int(w[1:]), i]), sides)
                _save(image, out / "train" / w / f"{w}_{i}.JPEG")
                bar.update()
        (out / "val").mkdir()
        rows = []
        for number, k in enumerate(order, start=1):
            w, i = val_items[k]
            image, box = _render(styles[w], np.random.default_rng([seed, _VAL, int(w[1:]), i]), sides)
            name = f"ILSVRC2012_val_{number:08d}"
            folder = out / "val" / w if val_folders else out / "val"
            folder.mkdir(exist_ok=True)
            _save(image, folder / f"{name}.JPEG")
            rows.append((name, " ".join([w, *map(str, box)])))
            bar.update()
    with open(out / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(rows)
    return {"train": len(wnids) * train_per_class, "val": len(val_items)}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m study.data.fake_imagenet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (train/, val/, LOC_val_solution.csv)")
    parser.add_argument("--synsets", type=positive_int, default=104,
                        help="classes: the ImageNet-100 list, then real wnids outside it (default: 104)")
    parser.add_argument("--train-per-class", type=positive_int, default=12,
                        help="train images per class (default: 12)")
    parser.add_argument("--val-per-class", type=positive_int, default=4, help="val images per class (default: 4)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every colour and pixel (default: 0)")
    parser.add_argument("--min-side", type=positive_int, default=300,
                        help="smallest image side in pixels (default: 300)")
    parser.add_argument("--max-side", type=positive_int, default=500,
                        help="largest image side in pixels (default: 500)")
    parser.add_argument("--val-folders", action="store_true",
                        help="write val/<wnid>/ folders instead of a flat val/ (the csv is written either way)")
    parser.add_argument("--overwrite", action="store_true", help="replace a tree already in --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = make_fake_imagenet(args.out, args.synsets, args.train_per_class, args.val_per_class, args.seed,
                                sides=(args.min_side, args.max_side), val_folders=args.val_folders,
                                overwrite=args.overwrite, progress=True)
    print(f"wrote {counts['train']} train and {counts['val']} val images of {args.synsets} synsets to "
          f"{args.out} in {duration(time.perf_counter() - start)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_command(main))
