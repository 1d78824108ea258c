"""ImageNet-100: the standard 100-class list (shipped) and a symlink builder.

The list is the usual ImageNet-100 subset (CMC, Tian et al. 2019), shipped as
``study/resources/imagenet100_classes.txt``. :func:`build_imagenet100` makes

    dst/train/<wnid> -> src/train/<wnid>      (one directory symlink per class)
    dst/val/<wnid>   -> src/val/<wnid>

from a local ImageNet-1k folder laid out as ``src/<split>/<wnid>/*.JPEG``.
Nothing is copied or downloaded. Some ImageNet copies keep ``val`` flat
(50,000 files, no class folders); that layout is detected and refused with a
message that says how to fix it.

Command line (wired as ``python -m study build-in100``)::

    python -m study build-in100 --src /data/imagenet --dst /data/imagenet100
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

__all__ = ["imagenet100_classes", "build_imagenet100", "check_class_folders", "main", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def _classes() -> tuple[str, ...]:
    text = resources.files("study").joinpath("resources/imagenet100_classes.txt").read_text()
    wnids = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    bad = [w for w in wnids if not _WNID.match(w)]
    if bad or len(wnids) != 100 or len(set(wnids)) != 100:
        raise RuntimeError(f"the shipped ImageNet-100 list is corrupt: {len(wnids)} entries, "
                           f"{len(set(wnids))} unique, malformed {bad[:5]}")
    return tuple(wnids)


def imagenet100_classes() -> list[str]:
    """The 100 WordNet ids of ImageNet-100, in the shipped order (labels use sorted order)."""
    return list(_classes())


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _count_images(folder: Path) -> int:
    n = 0
    for _root, _dirs, files in os.walk(folder, followlinks=True):
        n += sum(1 for f in files if _is_image(f))
    return n


def check_class_folders(split_dir: Path, wnids: Sequence[str]) -> list[str]:
    """Return the wnids in ``wnids`` that have no folder in ``split_dir``. Raises a
    clear error when ``split_dir`` is missing or holds images but no class folders."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist or is not a folder")
    entries = list(os.scandir(split_dir))
    has_dirs = any(e.is_dir() for e in entries)
    flat = sum(1 for e in entries if e.is_file() and _is_image(e.name))
    if flat and not has_dirs:
        raise ValueError(
            f"{split_dir} holds {flat} image files but no class folders (a flat ImageNet "
            f"validation layout). Move each image into a <wnid>/ folder first, e.g. with the "
            f"ILSVRC2012 validation ground truth (LOC_val_solution.csv or the common valprep.sh), "
            f"then run again.")
    return [w for w in wnids if not (split_dir / w).is_dir()]


def build_imagenet100(src: str | Path, dst: str | Path, splits: Sequence[str] = ("train", "val"), *,
                      overwrite: bool = False, allow_missing: bool = False,
                      classes: Sequence[str] | None = None) -> dict[str, int]:
    """Build ``dst/<split>/<wnid>`` as symlinks to ``src/<split>/<wnid>`` for the 100 classes.

    Returns ``{split: number of images linked}``. Refuses a non-empty ``dst``
    unless ``overwrite`` (which replaces only ``dst/<split>`` for the requested
    splits and never touches ``src``). Missing class folders are an error naming
    them, unless ``allow_missing`` (partial builds, for tests). ``classes``
    overrides the shipped list.
    """
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser()
    wnids = list(classes) if classes is not None else imagenet100_classes()
    if not src.is_dir():
        raise FileNotFoundError(f"ImageNet-1k folder {src} does not exist")
    if not splits:
        raise ValueError("no splits requested")
    if dst.resolve() == src or src in dst.resolve().parents:
        raise ValueError(f"--dst ({dst}) must not lie inside --src ({src})")

    # check everything before creating anything
    present: dict[str, list[str]] = {}
    for split in splits:
        missing = check_class_folders(src / split, wnids)
        if missing and not allow_missing:
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise FileNotFoundError(
                f"{src / split} lacks {len(missing)} of the {len(wnids)} ImageNet-100 class folders: {shown}")
        present[split] = [w for w in wnids if w not in set(missing)]

    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} is not empty; pass overwrite=True (--overwrite) to rebuild its "
                              f"{'/'.join(splits)} folders")

    counts: dict[str, int] = {}
    for split in splits:
        out = dst / split
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.is_dir():
            shutil.rmtree(out)  # removes the links themselves; never follows them into src
        out.mkdir(parents=True)
        n = 0
        for wnid in present[split]:
            target = src / split / wnid
            (out / wnid).symlink_to(target, target_is_directory=True)
            n += _count_images(target)
        counts[split] = n
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m study build-in100",
        description="Build ImageNet-100 (the shipped 100-class list) as per-class symlinks into a local "
                    "ImageNet-1k folder laid out as SRC/train/<wnid>/*.JPEG and SRC/val/<wnid>/*.")
    parser.add_argument("--src", required=True, help="ImageNet-1k root (holds train/ and val/)")
    parser.add_argument("--dst", required=True, help="folder to create (ImageNet-100 root)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default: train,val)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the split folders in a non-empty --dst")
    parser.add_argument("--allow-missing", action="store_true",
                        help="link the classes that exist and skip missing ones (partial build)")
    args = parser.parse_args(argv)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    try:
        counts = build_imagenet100(args.src, args.dst, splits, overwrite=args.overwrite,
                                   allow_missing=args.allow_missing)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"{split}: {n} images in {len(os.listdir(Path(args.dst) / split))} classes -> {Path(args.dst) / split}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
