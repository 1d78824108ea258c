"""Saving figures: PNG and PDF, atomically, with no dates in the metadata so reruns are byte-identical."""

from __future__ import annotations

import math

from pathlib import Path

import matplotlib
import seaborn as sns
from matplotlib import font_manager
from matplotlib.figure import Figure

from study.utils.io import atomic_write

# One style for every figure, set here rather than left to whichever figure a process drew first, so
# that a figure looks the same from `make figures` and from a report.
sns.set_theme(style="whitegrid", context="paper")


def _use_bundled_fonts() -> None:
    """Draw text only with the fonts shipped inside matplotlib. A host's own copy of DejaVu Sans (another
    version under /usr/share/fonts) would otherwise win the font lookup, and its font cache may not list
    the bundled files at all, so the PDFs' embedded fonts would change from host to host."""
    manager = font_manager.fontManager
    manager.ttflist = []
    for path in sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf")):
        manager.addfont(str(path))
    manager._findfont_cached.cache_clear()  # lookups made before this point named the host's files


_use_bundled_fonts()

__all__ = ["save_figure", "subplots", "paired_cell", "OBJECTIVE_LABELS", "OBJECTIVE_PALETTE"]

METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None},
}
OBJECTIVE_LABELS = {"ls": "least squares", "ls-head": "least squares (head)", "cimle": "cIMLE",
                    "cimle-head": "cIMLE (image, head)", "cimle-token": "cIMLE (token)", "mvae": "Masked VAE"}
OBJECTIVE_PALETTE = {"least squares": "#d95f02", "least squares (head)": "#e6ab02", "cIMLE": "#1b9e77",
                     "cIMLE (image, head)": "#1f78b4", "cIMLE (token)": "#66a61e", "Masked VAE": "#7570b3"}


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **subplot_kw):
    """``(Figure, axes)`` as ``plt.subplots`` returns, without pyplot: no global figure registry to close,
    no backend to select before import (saving picks the format's own backend)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_figure(fig, out_dir: str | Path, name: str, formats: tuple[str, ...] = ("png", "pdf"),
                **savefig_kwargs) -> list[Path]:
    """Write ``out_dir/name.{png,pdf}``; returns the paths."""
    out_dir = Path(out_dir)
    savefig_kwargs.setdefault("dpi", 150)
    paths = []
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, metadata=METADATA[fmt],
                                                            **savefig_kwargs))
        paths.append(path)
    return paths


def paired_cell(diff: float, low: float, high: float, digits: int, bold: bool = True) -> str:
    """A paired difference and its interval for a markdown table, ``+1.2 [-0.3, +2.7]``; in bold where the
    interval excludes 0 (unless ``bold`` is False); ``-`` for a value that is not finite."""
    def signed(x: float) -> str:
        return "-" if not math.isfinite(x) else f"{x:+.{digits}f}"

    cell = f"{signed(diff)} [{signed(low)}, {signed(high)}]"
    return f"**{cell}**" if bold and (low > 0 or high < 0) else cell
