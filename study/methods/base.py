"""The interface every pretraining objective implements, and what the model hands it.

The model (:class:`study.models.MaskedAutoencoder`) runs the encoder once and the decoder's
shared part once, then asks its objective for the loss from a :class:`Context`. The training loop
asks the objective only for the learning-rate scale of a parameter and whether DDP must look for
parameters without gradient; it never reads the objective's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from study.config import Config, NoiseConfig
from study.data.masking import MaskIndices

__all__ = ["Objective", "Context", "PretrainOutput", "randn_like_on"]


@dataclass
class PretrainOutput:
    """``loss``: scalar with gradient; ``stats``: detached scalars for logging; ``selection``: what an
    objective that chooses among samples chose (cIMLE's :class:`study.losses.CIMLEResult`)."""

    loss: Tensor
    stats: dict[str, Tensor]
    selection: Any = None


@dataclass
class Context:
    """One step's shared work: ``hidden [B, 1+N, Dd]`` is the decoder state where the noise enters
    (``model.decoder.suffix(hidden, z, mask)`` finishes the decoding), ``target [B, N, p*p*C]``."""

    imgs: Tensor  # [B, C, H, W]
    mask: Tensor  # [B, N] bool, True = masked
    ids: MaskIndices
    hidden: Tensor  # [B, 1+N, Dd]
    target: Tensor  # [B, N, p*p*C]
    generator: torch.Generator | None
    k: int | None  # samples this step (cIMLE), as the caller asked; None: the objective's own default
    draws: dict[str, Any] = field(default_factory=dict)  # the objective's :meth:`Objective.draw` for this step


class Objective:
    """A pretraining objective. Subclasses override :meth:`loss` and what else they need."""

    name = "?"
    # True when some parameters get no gradient in a step (DDP then searches the graph for them)
    find_unused_parameters = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def decoder_noise(self) -> NoiseConfig | None:
        """The noise the decoder takes (None: a deterministic decoder)."""
        return None

    def modules(self) -> dict[str, nn.Module]:
        """Modules this objective adds to the model, by attribute name (built after encoder and decoder)."""
        return {}

    def lr_scale(self, parameter_name: str) -> float:
        """The learning-rate multiplier of a model parameter (by its name in ``model.named_parameters()``)."""
        return 1.0

    def draw(self, model: nn.Module, batch: int, num_masked: int, k: int | None, generator: torch.Generator | None,
             device: torch.device) -> dict[str, Any]:
        """What the step's :meth:`loss` draws from ``generator``, drawn beforehand, in the order it would be: a
        compiled step runs :meth:`loss` on these (a generator inside a compiled graph breaks it)."""
        return {}

    def loss(self, model: nn.Module, ctx: Context) -> PretrainOutput:
        """The step's loss; ``model`` is the :class:`study.models.MaskedAutoencoder` (its decoder, its
        ``noise_shape`` and the modules of :meth:`modules`)."""
        raise NotImplementedError


def randn_like_on(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device, moved to ``like``'s device and dtype."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
