"""Console output that reads well both on a terminal and in a log file.

On a terminal (or in Jupyter) long loops show a tqdm progress bar; when the
output goes to a file or a pipe the bars are off, because every redraw would
land in the log as a carriage-return line, and the callers print one plain
line per epoch or per protocol instead.
"""

from __future__ import annotations

import sys
from typing import IO

__all__ = ["interactive", "duration"]


def interactive(stream: IO | None = None) -> bool:
    """True if ``stream`` (default: stderr, where tqdm draws) is a terminal or a Jupyter output."""
    stream = sys.stderr if stream is None else stream
    if type(stream).__module__.startswith("ipykernel"):
        return True  # tqdm.auto draws a widget there, not carriage returns
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``185`` -> ``"3m05s"``, ``7.4`` -> ``"7s"``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
