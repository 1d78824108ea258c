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
from study.errors import UserError

__all__ = ["BenchSettingsError", "DEFAULT_KS", "DEFAULT_SELECTION_KS", "DEFAULT_SELECTION_CHUNKS", "PRECISIONS",
           "Plan", "Block", "with_changes", "check_counts", "check_precisions", "late_noise_blocks", "selection_block_of",
           "block_order"]

class BenchSettingsError(UserError, ValueError):
    """Bench settings that cannot run (reported as one ``error:`` line)."""


DEFAULT_KS = (1, 2, 4, 8, 16)
DEFAULT_SELECTION_KS = (4, 8, 16)
DEFAULT_SELECTION_CHUNKS = (1, 2, 4, 8)
PRECISIONS = ("fp32", "bf16", "fp16")

Block = int | str  # a decoder block index, or "head": the token-wise head after the last attention


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
    late: list[Block]  # noise blocks of the late-noise rows (empty: none)
    late_k: int
    selection_ks: Sequence[int]
    selection_chunks: Sequence[int]
    selection_block: Block
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
        raise BenchSettingsError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise BenchSettingsError(f"--k must list ints >= 1, got {ks}")
    return ks


def check_precisions(precisions: Sequence[str], device: torch.device) -> list[str]:
    """Distinct precisions in the order given; fp16 needs CUDA (as :func:`study.runtime.autocast` rules)."""
    out = list(dict.fromkeys(precisions))
    bad = [p for p in out if p not in PRECISIONS]
    if not out or bad:
        raise BenchSettingsError(f"--precision must list some of {', '.join(PRECISIONS)}, "
                                 f"got {','.join(precisions)}")
    if "fp16" in out and device.type != "cuda":
        raise BenchSettingsError("--precision fp16 needs CUDA; use fp32 and/or bf16 on CPU")
    return out


def block_order(block: Block) -> tuple[int, int]:
    """Sort key: block indices in order, the head after them."""
    return (1, 0) if block == "head" else (0, int(block))


def _check_block(block: Block, depth: int, what: str) -> Block:
    if block == "head":
        return block
    try:
        block = int(block)
    except (TypeError, ValueError):
        raise BenchSettingsError(f"{what} must be 'head' or an int in [0, decoder_depth={depth}], "
                                 f"got {block!r}") from None
    if not 0 <= block <= depth:
        raise BenchSettingsError(f"{what} must be 'head' or lie in [0, decoder_depth={depth}], got {block}")
    return block


def late_noise_blocks(cfg: Config, late_noise: bool, blocks: Sequence[Block] | None) -> list[Block]:
    """The late-noise rows' blocks: ``blocks``, or the decoder input, its last block and the token-wise head."""
    if not late_noise:
        return []
    depth = cfg.model.decoder_depth
    chosen = [0, depth - 1, "head"] if blocks is None else blocks
    return sorted({_check_block(b, depth, "late noise blocks") for b in chosen}, key=block_order)


def selection_block_of(cfg: Config, block: Block | None) -> Block:
    """The selection grid's noise block: ``block``, or the config's ``noise.block``."""
    return _check_block(cfg.noise.block if block is None else block, cfg.model.decoder_depth, "selection block")
