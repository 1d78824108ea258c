"""Counting host syncs: a ``TorchFunctionMode`` that records every tensor call forcing a host-device sync on CUDA.

It records ``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``,
``.numpy()``, ``.nonzero()``, ``.cpu()``, boolean-mask indexing and copies of
CPU tensors to another device that are blocking or from pageable memory, each with
the innermost line of code outside torch's dispatch glue and outside the
tests that made it, so that a failing test points at the study code to fix.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SyncCounter"]

_SYNC_METHODS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "nonzero", "cpu"}
_TESTS_DIR = Path(__file__).resolve().parent
# reported paths are relative to the checkout (``study/methods/model.py:...``)
_ROOT = str(_TESTS_DIR.parent)
_TORCH_GLUE = (os.sep + os.path.join("torch", "overrides.py"), os.sep + os.path.join("torch", "_tensor.py"),
               os.sep + os.path.join("torch", "utils", "_device.py"))


def _where(frame: traceback.FrameSummary) -> str:
    fname = str(Path(frame.filename).resolve())
    if "site-packages" + os.sep in fname:
        fname = fname.split("site-packages" + os.sep, 1)[1]
    elif fname.startswith(_ROOT + os.sep):
        fname = os.path.relpath(fname, _ROOT)
    return f"{fname}:{frame.lineno} ({frame.name}: {(frame.line or '').strip()[:80]})"


def _caller() -> str:
    """The innermost frame that made the call (leaving out torch's dispatch glue and the tests themselves)."""
    tests = str(_TESTS_DIR) + os.sep
    for frame in reversed(traceback.extract_stack()[:-2]):
        fname = str(Path(frame.filename).resolve())
        if not fname.startswith(tests) and not fname.endswith(_TORCH_GLUE):
            return _where(frame)
    return "?"


def _blocking_upload(name: str, src, args: tuple, kwargs: dict) -> bool:
    """``src.to(...)`` / ``src.cuda()`` of a CPU tensor to another device that waits for the copy: always from
    pageable memory (CUDA stages it), and from pinned memory unless ``non_blocking``."""
    if not isinstance(src, Tensor) or src.device.type != "cpu":
        return False
    dest = kwargs.get("device", "cuda" if name == "cuda" else None)
    for a in args:
        if isinstance(a, (torch.device, str)):
            dest = a
        elif isinstance(a, Tensor):
            dest = a.device
    if dest is None or torch.device(dest).type == "cpu":
        return False
    return not (src.is_pinned() and kwargs.get("non_blocking", False))


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Records the tensor calls that force a host-device sync on CUDA, with the study line that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        hit = name in _SYNC_METHODS
        if name == "__getitem__" and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            hit = any(isinstance(i, Tensor) and i.dtype == torch.bool for i in idx)
            name = "bool-mask indexing" if hit else name
        if name in ("to", "cuda") and args and _blocking_upload(name, args[0], args[1:], kwargs):
            hit, name = True, "host-to-device copy"
        if hit:
            self.hits[f"{name} @ {_caller()}"] += 1
        return func(*args, **kwargs)
