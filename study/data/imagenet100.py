"""ImageNet-100: the standard 100-class list and a builder from a local ImageNet-1k.

The list is the usual subset (CMC, Tian et al. 2019), shipped as
``study/resources/imagenet100_classes.txt``. :func:`build_imagenet100`
(``python -m study build-in100``) makes ``dst/train/<wnid>`` and ``dst/val/<wnid>``.
A flat ``val/`` is sorted into classes by a label file: Kaggle's
``LOC_val_solution.csv``, ``<filename> <wnid>`` lines, or one wnid per line in
file order (TensorFlow's ``imagenet_2012_validation_synset_labels.txt``); class
numbers are refused because their numbering differs between sources. The output
holds symlinks, or with ``--copy`` copies written under a temporary name and
renamed, so an interrupted build never leaves a half-copied image and running
it again with the same arguments finishes it. Only classes with images in every
split are built, so train and val share class indices (``dst/classes.txt``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

from study.utils.args import OneLineParser
from study.utils.console import interactive
from study.utils.errors import WRITE_ERRNOS, UserError, run_command, write_error

__all__ = ["imagenet100_classes", "build_imagenet100", "read_val_labels", "find_val_labels", "BuildSummary",
           "main", "IMAGE_EXTENSIONS", "VAL_LABEL_NAMES"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_LABEL_NAMES = ("LOC_val_solution.csv", "val_labels.txt", "imagenet_2012_validation_synset_labels.txt")
CLASSES_FILE = "classes.txt"
_MARKER = ".build-in100.json"  # present while a build is unfinished; records what it was building
_WNID = re.compile(r"^n\d{8}$")
_SHOWN = 5  # how many wnids an error message names


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


# --------------------------------------------------------------------------- validation labels


def _val_key(name: str) -> str:
    """``ILSVRC2012_val_00000001.JPEG``, ``val/ILSVRC2012_val_00000001`` -> ``ILSVRC2012_val_00000001``."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS else base


def _add_label(labels: dict[str, str], key: str, wnid: str, where: str) -> None:
    if labels.setdefault(key, wnid) != wnid:
        raise UserError(f"{where}: {key} is labelled both {labels[key]} and {wnid}")


def _kaggle_labels(rows: list[str], path: Path) -> dict[str, str]:
    labels: dict[str, str] = {}
    for n, row in enumerate(csv.reader(rows[1:]), start=2):
        if not row:
            continue
        wnid = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
        if not _WNID.match(wnid):
            raise UserError(f"line {n} of {path}: expected 'ImageId,<wnid> <box> ...', got {','.join(row)[:80]!r}")
        _add_label(labels, _val_key(row[0]), wnid, f"line {n} of {path}")
    return labels


def _index_form_error(path: Path, line: str) -> UserError:
    return UserError(
        f"{path} gives class numbers, not wnids (first line {line[:60]!r}); the numbering differs between "
        "sources (the devkit's ground truth counts ILSVRC2012_IDs from meta.mat, Caffe's val.txt counts sorted "
        "wnids from 0), so give Kaggle's LOC_val_solution.csv or a file of '<filename> <wnid>' lines")


def _text_labels(lines: list[str], path: Path) -> dict[str, str]:
    rows = [(n, line.replace(",", " ").split()) for n, line in enumerate(lines, start=1) if line.strip()]
    first = rows[0][1]
    if first[-1].isdigit():
        raise _index_form_error(path, lines[rows[0][0] - 1])
    if len(first) == 1:  # one wnid per line, in file order
        keyed = [(n, [f"ILSVRC2012_val_{i:08d}", *tokens]) for i, (n, tokens) in enumerate(rows, start=1)]
    else:
        keyed = rows
    labels: dict[str, str] = {}
    for n, tokens in keyed:
        if len(tokens) != 2 or not _WNID.match(tokens[1]):
            expected = "<wnid>" if len(first) == 1 else "<filename> <wnid>"
            raise UserError(f"line {n} of {path}: expected '{expected}', got {lines[n - 1].strip()[:80]!r}")
        _add_label(labels, _val_key(tokens[0]), tokens[1], f"line {n} of {path}")
    return labels


def read_val_labels(path: str | Path) -> dict[str, str]:
    """``{image stem: wnid}`` from a Kaggle ``LOC_val_solution.csv`` or a text label file (see module doc)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"validation label file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file; give LOC_val_solution.csv or a '<filename> <wnid>' list") from None
    if not any(line.strip() for line in lines):
        raise UserError(f"validation label file {path} is empty")
    first = next(line for line in lines if line.strip())
    if first.replace(" ", "").lower().startswith("imageid,"):
        return _kaggle_labels([line for line in lines if line.strip()], path)
    return _text_labels(lines, path)


def _label_search_dirs(src: Path) -> list[Path]:
    dirs = [src, src / "val", src.parent]
    if src.parts[-3:] == ("ILSVRC", "Data", "CLS-LOC"):
        dirs.append(src.parents[2])
    return dirs


def find_val_labels(src: str | Path) -> Path | None:
    """The first of :data:`VAL_LABEL_NAMES` found in ``src``, ``src/val``, ``src/..`` (and Kaggle's root)."""
    for folder in _label_search_dirs(Path(src)):
        for name in VAL_LABEL_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


# --------------------------------------------------------------------------- reading the source


@dataclass
class _Split:
    """The images of the wanted classes in ``src/<name>``, as ``(path under root, path in the class folder)``."""

    name: str
    root: Path
    flat: bool
    images: dict[str, list[tuple[str, str]]]
    labels: Path | None = None  # the label file that sorted a flat split
    unlabelled: int = 0


def _folder_images(root: Path, wnid: str) -> list[tuple[str, str]]:
    class_dir = root / wnid
    found = []
    for dirpath, dirnames, files in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, class_dir)
        for f in sorted(files):
            if _is_image(f):
                inner = f if rel == "." else os.path.join(rel, f)
                found.append((os.path.join(wnid, inner), inner))
    return found


def _flat_images(root: Path, loose: list[str], wnids: Sequence[str], labels_path: Path) -> _Split:
    labels = read_val_labels(labels_path)
    wanted = set(wnids)
    images: dict[str, list[tuple[str, str]]] = {}
    unlabelled = 0
    for name in sorted(loose):
        wnid = labels.get(_val_key(name))
        if wnid is None:
            unlabelled += 1
        elif wnid in wanted:
            images.setdefault(wnid, []).append((name, name))
    if unlabelled == len(loose):
        raise UserError(f"{labels_path} labels none of the {len(loose)} images in {root} "
                        f"(e.g. {sorted(loose)[0]}); is it the validation label file of this ImageNet copy?")
    return _Split("val", root, True, images, labels_path, unlabelled)


def _no_labels_error(src: Path, root: Path, n: int) -> UserError:
    looked = ", ".join(str(d) for d in _label_search_dirs(src))
    return UserError(
        f"{root} is flat ({n} images, no class folders) and no label file was found; give --val-labels FILE "
        f"(Kaggle's LOC_val_solution.csv or a text file of '<filename> <wnid>' lines); looked for "
        f"{', '.join(VAL_LABEL_NAMES)} in {looked}")


def _scan_split(src: Path, split: str, wnids: Sequence[str], val_labels: Path | None) -> _Split:
    root = src / split
    if not root.is_dir():
        raise UserError(f"{root} does not exist or is not a folder")
    entries = list(os.scandir(root))
    loose = [e.name for e in entries if _is_image(e.name) and e.is_file()]
    folders = [e.name for e in entries if e.is_dir()]
    if not loose:
        if split == "val" and val_labels is not None:
            raise UserError(f"--val-labels is for a flat val/, but {root} holds class folders; drop the option")
        return _Split(split, root, False, {w: found for w in wnids if (found := _folder_images(root, w))})
    if folders:
        raise UserError(f"{root} holds both {len(folders)} folders (e.g. {sorted(folders)[0]}) and {len(loose)} "
                        f"loose images; move every image into its <wnid>/ folder or every folder's images out")
    if split != "val":
        raise UserError(f"{root} holds {len(loose)} images but no class folders; only val/ may be flat, "
                        f"{split}/ must hold one <wnid>/ folder per class")
    labels_path = val_labels or find_val_labels(src)
    if labels_path is None:
        raise _no_labels_error(src, root, len(loose))
    return _flat_images(root, loose, wnids, labels_path)


def _kept_classes(scans: Sequence[_Split], wnids: Sequence[str],
                  allow_missing: bool) -> tuple[list[str], dict[str, list[str]]]:
    """The classes with images in every split (sorted) and, for the others, the splits that lack them."""
    lacking = {w: [s.name for s in scans if w not in s.images] for w in wnids}
    dropped = {w: splits for w, splits in lacking.items() if splits}
    if dropped and not allow_missing:
        per_split = ", ".join(f"{s.name} {sum(s.name in v for v in dropped.values())}" for s in scans)
        shown = ", ".join(f"{w} ({'/'.join(v)})" for w, v in list(dropped.items())[:_SHOWN])
        more = ", ..." if len(dropped) > _SHOWN else ""
        raise UserError(
            f"the source lacks {len(dropped)} of the {len(wnids)} listed classes (classes without images per "
            f"split: {per_split}): {shown}{more}; pass --allow-missing to build the "
            f"{len(wnids) - len(dropped)} classes present in every split")
    if len(dropped) == len(wnids):
        raise UserError(f"none of the {len(wnids)} listed classes has images in every split "
                        f"({', '.join(s.name for s in scans)}); is --src the ImageNet-1k root?")
    return sorted(w for w in wnids if w not in dropped), dropped


# --------------------------------------------------------------------------- writing the output


def _marker_state(src: Path, splits: Sequence[str], copy: bool) -> dict:
    return {"src": str(src), "splits": list(splits), "copy": copy}


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # removes links themselves; never follows them into src


def _read_marker(marker: Path) -> dict | None:
    if not marker.is_file():
        return None
    try:
        state = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _split_names(state: dict) -> list[str]:
    """The split folders an unfinished build was writing (names only: the marker is not trusted with paths)."""
    names = state.get("splits", [])
    if not isinstance(names, list):
        return []
    return [s for s in names if isinstance(s, str) and s not in ("", ".", "..") and Path(s).name == s]


def _prepare_dst(dst: Path, splits: Sequence[str], state: dict, overwrite: bool) -> str:
    """Make ``dst`` ready for the build: ``"new"``, or ``"resumed"`` / ``"restarted"`` for an unfinished
    build with the same / other settings (it holds nothing worth keeping, so other settings start over)."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a folder")
    marker = dst / _MARKER
    unfinished = _read_marker(marker)
    if unfinished == state and not overwrite:
        return "resumed"
    if unfinished is None and dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"{dst} is not empty; pass overwrite=True (--overwrite) to rebuild its "
                        f"{'/'.join(splits)} folders")
    for split in dict.fromkeys([*splits, *_split_names(unfinished or {})]):
        _remove(dst / split)
    dst.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(state))
    return "restarted" if unfinished is not None and not overwrite else "new"


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    _remove(link)
    try:
        link.symlink_to(target, target_is_directory=target.is_dir())
    except OSError as exc:
        raise UserError(f"cannot create the symlink {link}: {exc.strerror}; pass --copy to copy the images "
                        "where symlinks are not allowed") from exc


def _copy(source: Path, dest: Path) -> None:
    if not dest.is_symlink() and dest.is_file() and dest.stat().st_size == source.stat().st_size:
        return  # only ever renamed into place once complete
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        shutil.copyfile(source, partial)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        partial.unlink(missing_ok=True)
        raise write_error(exc, dest, "the images copied so far are kept; free space and rerun the same command "
                                     "to finish the build") from exc
    os.replace(partial, dest)


def _write_class(scan: _Split, wnid: str, out: Path, copy: bool) -> None:
    if not copy and not scan.flat:
        _link(scan.root / wnid, out)
        return
    if out.is_symlink():
        out.unlink()
    out.mkdir(exist_ok=True)
    put = _copy if copy else _link
    for source, inner in scan.images[wnid]:
        dest = out / inner
        if os.sep in inner:
            dest.parent.mkdir(parents=True, exist_ok=True)
        put(scan.root / source, dest)


def _write_split(scan: _Split, classes: Sequence[str], out: Path, copy: bool, progress: bool) -> int:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(scan.images[w]) for w in classes)
    verb = "copy" if copy else "link"
    with tqdm(total=total, desc=f"{verb} {scan.name}", unit="img", disable=not (progress and interactive())) as bar:
        for wnid in classes:
            _write_class(scan, wnid, out / wnid, copy)
            bar.update(len(scan.images[wnid]))
    return total


@dataclass
class BuildSummary:
    """What :func:`build_imagenet100` built."""

    counts: dict[str, int]  # images per split
    classes: list[str]  # the classes built, in label (sorted) order; also in dst/classes.txt
    dropped: dict[str, list[str]] = field(default_factory=dict)  # wnid -> the splits without images of it
    val_labels: Path | None = None  # the label file used for a flat val/
    unlabelled: int = 0  # images of a flat val/ that the label file does not name
    start: str = "new"  # or "resumed" / "restarted": an unfinished build with the same / other settings


def build_imagenet100(src: str | Path, dst: str | Path, splits: Sequence[str] = ("train", "val"), *,
                      overwrite: bool = False, allow_missing: bool = False,
                      classes: Sequence[str] | None = None, copy: bool = False,
                      val_labels: str | Path | None = None, progress: bool = False) -> BuildSummary:
    """Build ``dst/<split>/<wnid>`` for the ImageNet-100 classes from the ImageNet-1k at ``src``.

    Refuses a non-empty ``dst`` unless ``overwrite`` (which replaces only
    ``dst/<split>`` for the requested splits and never touches ``src``); an
    unfinished build is resumed by a rerun with the same ``src``, ``splits``
    and ``copy``, and started over by one with other settings. A class without images in some split is an error, unless
    ``allow_missing``, which builds only the classes present in every split.
    ``classes`` overrides the shipped list; ``val_labels`` the label file of a
    flat ``val/`` (found automatically otherwise, see the module doc).
    """
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser()
    wnids = list(classes) if classes is not None else imagenet100_classes()
    if not src.is_dir():
        raise UserError(f"ImageNet-1k folder {src} does not exist")
    if not splits:
        raise UserError("no splits requested")
    if dst.resolve() == src or src in dst.resolve().parents:
        raise UserError(f"--dst ({dst}) must not lie inside --src ({src})")
    labels = Path(val_labels).expanduser().resolve() if val_labels is not None else None

    # read and check everything before creating anything
    scans = [_scan_split(src, split, wnids, labels) for split in splits]
    kept, dropped = _kept_classes(scans, wnids, allow_missing)
    start = _prepare_dst(dst, splits, _marker_state(src, splits, copy), overwrite)

    counts = {scan.name: _write_split(scan, kept, dst / scan.name, copy, progress) for scan in scans}
    (dst / CLASSES_FILE).write_text("".join(f"{w}\n" for w in kept))
    (dst / _MARKER).unlink()
    flat = next((s for s in scans if s.flat), None)
    return BuildSummary(counts, kept, dropped, flat.labels if flat else None, flat.unlabelled if flat else 0,
                        start)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m study build-in100",
        description="Build ImageNet-100 (the shipped 100-class list) from a local ImageNet-1k laid out as "
                    "SRC/train/<wnid>/*.JPEG and SRC/val/<wnid>/*.JPEG or a flat SRC/val/*.JPEG with a label file.")
    parser.add_argument("--src", required=True, help="ImageNet-1k root (holds train/ and val/)")
    parser.add_argument("--dst", required=True, help="folder to create (ImageNet-100 root)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default: train,val)")
    parser.add_argument("--val-labels", metavar="FILE",
                        help="label file for a flat val/: Kaggle's LOC_val_solution.csv or '<filename> <wnid>' "
                             f"lines (default: look for {', '.join(VAL_LABEL_NAMES)} in SRC, SRC/val and SRC/..)")
    parser.add_argument("--copy", action="store_true",
                        help="copy the images instead of symlinking them (a rerun finishes an interrupted copy)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the split folders in a non-empty --dst")
    parser.add_argument("--allow-missing", action="store_true",
                        help="build only the classes with images in every split, dropping the others")
    return parser


def _report(summary: BuildSummary, dst: Path) -> None:
    if summary.start == "resumed":
        print(f"finished the interrupted build in {dst}")
    elif summary.start == "restarted":
        print(f"started the interrupted build in {dst} over: it had other settings")
    if summary.val_labels is not None:
        print(f"val labels: {summary.val_labels}")
    if summary.unlabelled:
        print(f"note: {summary.unlabelled} images of the flat val/ have no label in {summary.val_labels} "
              "and were left out")
    if summary.dropped:
        shown = ", ".join(f"{w} ({'/'.join(v)})" for w, v in list(summary.dropped.items())[:_SHOWN])
        more = ", ..." if len(summary.dropped) > _SHOWN else ""
        print(f"dropped {len(summary.dropped)} classes without images in some split: {shown}{more}")
    print(f"classes: {len(summary.classes)} -> {dst / CLASSES_FILE}")
    for split, n in summary.counts.items():
        print(f"{split}: {n} images in {len(summary.classes)} classes -> {dst / split}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    summary = build_imagenet100(args.src, args.dst, splits, overwrite=args.overwrite,
                                allow_missing=args.allow_missing, copy=args.copy,
                                val_labels=args.val_labels, progress=True)
    _report(summary, Path(args.dst))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_command(main))
