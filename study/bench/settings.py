"""The run's settings, checked before any work: device, batch, the k list, the late-noise blocks, the selection grid.

:class:`Plan` is what every later stage reads; :func:`with_changes` makes the
config copies the stages need (an objective, a noise block, the batch size)
without touching the config they were given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from study.config import Config

__all__ = ["DEFAULT_KS", "DEFAULT_SELECTION_KS", "DEFAULT_SELECTION_CHUNKS", "Plan", "with_changes",
           "check_counts", "late_noise_blocks", "selection_block_of"]

DEFAULT_KS = (1, 2, 4, 8, 16)
DEFAULT_SELECTION_KS = (4, 8, 16)
DEFAULT_SELECTION_CHUNKS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Plan:
    """The checked settings of one run."""

    cfg: Config  # with the bench's batch size and compile flag
    device: torch.device
    batch: int
    ks: list[int]  # sorted, distinct, >= 1
    steps: int
    warmup: int
    transformers: bool
    compile_models: bool
    late: list[int]  # noise blocks of the late-noise rows (empty: none)
    late_k: int
    selection_ks: Sequence[int]
    selection_chunks: Sequence[int]
    selection_block: int
    selection_timing: bool
    config_path: str | None


def with_changes(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with fields replaced: ``with_changes(cfg, objective="ls", noise={"block": 3})``.

    A dict value replaces fields of that section; any other value replaces the top-level field.
    """
    top = {k: v for k, v in sections.items() if not isinstance(v, dict)}
    nested = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items() if isinstance(v, dict)}
    return dataclasses.replace(cfg, **top, **nested)


def check_counts(steps: int, warmup: int, ks: Sequence[int]) -> list[int]:
    """Refuse impossible round counts and k values; returns the k values sorted and distinct."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"--k must list ints >= 1, got {ks}")
    return ks


def late_noise_blocks(cfg: Config, late_noise: bool, blocks: Sequence[int] | None) -> list[int]:
    """The late-noise rows' blocks: ``blocks``, or the decoder input and its last block (the same at depth 1)."""
    if not late_noise:
        return []
    depth = cfg.model.decoder_depth
    late = sorted(set(sorted({0, depth - 1}) if blocks is None else blocks))
    bad = [b for b in late if not 0 <= b <= depth]
    if bad:
        raise ValueError(f"late noise blocks must lie in [0, decoder_depth={depth}], got {bad}")
    return late


def selection_block_of(cfg: Config, block: int | None) -> int:
    """The selection grid's noise block: ``block``, or the config's ``noise.block``."""
    depth = cfg.model.decoder_depth
    block = cfg.noise.block if block is None else int(block)
    if not 0 <= block <= depth:
        raise ValueError(f"selection block must lie in [0, decoder_depth={depth}], got {block}")
    return block
