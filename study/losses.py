"""The pretraining objectives, shared by the toy MLPs and the ViT MAE.

Every objective reduces to :func:`least_squares` on some prediction, so the loss code
exists once: :func:`cimle` draws k noise samples per example, decodes them without
gradient and returns least squares at the nearest one (``select="token"``: the
nearest per position, exact only for a token-wise head); :func:`gaussian_kl` is the
Masked VAE's regulariser. ``target`` is ``(B, *positions, *features)``; ``mask``, when
given, is ``(B, *positions)``, its nonzero entries being the positions that count
(MAE: the masked patches), and the feature dims it does not cover are averaged
inside each position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

__all__ = ["least_squares", "per_example_squared_error", "cimle", "cimle_noise", "CIMLEResult",
           "nearest_of_k_amplitude", "gaussian_kl"]


def _check_mask(target: Tensor, mask: Tensor | None, name: str = "target") -> None:
    if mask is None:
        return
    if mask.ndim == 0 or mask.ndim > target.ndim:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but must cover the leading dims of "
            f"{name} {tuple(target.shape)} (batch first, feature dims left out)"
        )
    if tuple(mask.shape) != tuple(target.shape[: mask.ndim]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the leading dims of "
            f"{name} shape {tuple(target.shape)}; expected {tuple(target.shape[: mask.ndim])}"
        )


def _check_pred(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}"
        )


def _error_per_position(pred: Tensor, target: Tensor, mask_ndim: int) -> Tensor:
    """Squared error averaged over the feature dims that follow the first ``mask_ndim`` dims."""
    err = (pred - target).pow(2)
    feature_dims = tuple(range(mask_ndim, target.ndim))
    return err.mean(dim=feature_dims) if feature_dims else err


def least_squares(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per element; with ``mask``, only over the selected positions.

    The normalisation is global (sum of selected errors / number of selected
    elements), as in the MAE, so examples with more masked positions weigh more.
    """
    _check_pred(pred, target)
    if mask is None:
        return (pred - target).pow(2).mean()
    _check_mask(target, mask)
    err = _error_per_position(pred, target, mask.ndim)  # [B, *positions]
    weight = mask.to(err.dtype)
    total = weight.sum()
    # checked on CPU only: on CUDA the comparison would stall the host every step; an empty mask
    # there gives a NaN loss, which the training loop stops on (TrainingDiverged). A compiled step
    # skips it too: the branch on a tensor's value would break its graph
    if total.device.type == "cpu" and not torch.compiler.is_compiling() and total <= 0:
        raise ValueError("mask selects no element: the loss is undefined")
    return (err * weight).sum() / total


def per_example_squared_error(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error of each example over its selected elements: shape ``(B,)``.

    This is the distance cIMLE minimises when it picks a sample. Rows whose mask
    selects nothing get distance 0 (every sample is equally near).
    """
    _check_pred(pred, target)
    batch = target.shape[0]
    if mask is None:
        return (pred - target).pow(2).reshape(batch, -1).mean(dim=1)
    _check_mask(target, mask)
    err = _error_per_position(pred, target, mask.ndim).reshape(batch, -1)
    weight = mask.to(err.dtype).reshape(batch, -1)
    return (err * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


@dataclass
class CIMLEResult:
    """What one cIMLE step produced.

    loss:      scalar, differentiable: ``least_squares`` at the chosen noise.
    z:         ``(B, *noise_shape)`` the chosen noise per example.
    distances: ``(B, k)`` distance of every sample to the target (no gradient);
               ``select="token"``: ``(B, k, *positions)``, per position (0 where
               the mask leaves a position out).
    index:     ``(B,)`` which of the k samples was chosen; ``select="token"``:
               ``(B, *positions)``, per position.
    pred:      the prediction at the chosen noise (with gradient), shaped like target.
    """

    loss: Tensor
    z: Tensor
    distances: Tensor
    index: Tensor
    pred: Tensor


def _as_shape(noise_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (noise_shape,) if isinstance(noise_shape, int) else tuple(noise_shape)
    if not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"noise_shape must be positive ints, got {noise_shape!r}")
    return shape


def _check_cimle_args(target: Tensor, *, k, noise_shape, mask: Tensor | None, chunk, select: str) -> tuple[int, ...]:
    """Validate :func:`cimle`'s arguments; returns the noise shape as a tuple."""
    if select not in ("image", "token"):
        raise ValueError(f"select must be 'image' or 'token', got {select!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")
    shape = _as_shape(noise_shape)
    _check_mask(target, mask)
    if select == "token":
        n_pos = len(shape) - 1 if mask is None else mask.ndim - 1
        positions = tuple(target.shape[1 : 1 + n_pos])
        if n_pos < 1 or len(shape) != n_pos + 1 or shape[:-1] != positions:
            raise ValueError(
                f"select='token' needs noise_shape (*positions, dim) with positions {positions} "
                f"(the mask's dims after the batch), got {shape}"
            )
    return shape


def _sample_distances(predict: Callable[[Tensor], Tensor], noise: Tensor, target: Tensor, mask: Tensor | None,
                      chunk: int | None, vectorize: bool, select: str,
                      decode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Squared error of every sample: ``[B, k]`` (image) or ``[B, k, *positions]`` (token).

    ``noise [k, B, *noise_shape]`` is decoded ``chunk`` samples at a time."""
    k, batch = noise.shape[:2]
    step = k if chunk is None else min(chunk, k)
    if decode is None and vectorize:
        decode = torch.func.vmap(predict, randomness="different")
    parts = []
    for start in range(0, k, step):
        z = noise[start : start + step]  # [c, B, *noise_shape]
        preds = decode(z) if decode is not None else torch.stack([predict(zi) for zi in z])  # [c, B, ...]
        if preds.shape[1:] != target.shape:
            raise ValueError(
                f"predict(z) returned shape {tuple(preds.shape[1:])}, expected target shape {tuple(target.shape)}"
            )
        c = preds.shape[0]
        if select == "token":
            parts.append(_per_position_error(preds, target, mask, noise.ndim - 3))
            continue
        dist = per_example_squared_error(
            preds.reshape(c * batch, *target.shape[1:]),
            target.repeat(c, *([1] * (target.ndim - 1))),
            None if mask is None else mask.repeat(c, *([1] * (mask.ndim - 1))),
        )
        parts.append(dist.reshape(c, batch))
    if select == "token":
        return torch.cat(parts).transpose(0, 1).contiguous()  # [B, k, *positions]
    return torch.cat(parts).t().contiguous()  # [B, k]


def _nearest_noise(noise: Tensor, distances: Tensor, select: str) -> tuple[Tensor, Tensor]:
    """``(chosen noise [B, *noise_shape], index)``: the nearest sample per image, or per position (token)."""
    index = distances.argmin(dim=1)  # [B] or [B, *positions]
    if select == "token":
        pick = index[None, ..., None].expand(1, *index.shape, noise.shape[-1])  # [1, B, *positions, dim]
        return noise.gather(0, pick)[0], index  # [B, *positions, dim]
    return noise[index, torch.arange(noise.shape[1], device=noise.device)], index  # [B, *noise_shape]


def cimle(
    predict: Callable[[Tensor], Tensor],
    target: Tensor,
    *,
    k: int,
    noise_shape: int | Sequence[int],
    mask: Tensor | None = None,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    select: str = "image",
    noise: Tensor | None = None,
    decode_samples: Callable[[Tensor], Tensor] | None = None,
) -> CIMLEResult:
    """Conditional IMLE: min over k noise samples of the squared error, per example.

    ``predict(z)`` maps noise ``(B, *noise_shape)`` to a prediction shaped like
    ``target``. Selection runs without gradient; with ``vectorize`` the samples
    are decoded ``chunk`` at a time (all k when ``chunk`` is None) through
    ``torch.func.vmap``, so ``predict`` never sees more than B rows yet the work
    is batched. Work that ``predict`` closes over (the encoder, shared decoder
    blocks) is therefore done once, not k times. ``vectorize=False`` decodes one
    sample per call, for a ``predict`` that vmap cannot trace.

    The noise is drawn as one ``(k, B, *noise_shape)`` tensor from
    ``generator``, so chunking changes the batching but not the samples;
    ``noise`` passes that tensor in, drawn beforehand by :func:`cimle_noise`
    (a compiled step draws outside its graph: a generator breaks it).
    ``decode_samples(z [c, B, *noise_shape]) -> [c, B, ...]``: decodes c
    samples in one call, in place of vmap (the model folds them into the batch).

    ``select="token"``: ``noise_shape`` is ``(*positions, dim)``, one noise
    vector per position, and ``positions`` are the dims of ``mask`` after the
    batch (without a mask: ``noise_shape[:-1]``, which must match the dims of
    ``target`` after the batch). Every position takes the noise of its own
    nearest sample; the loss is ``least_squares`` of ``predict`` at that
    assembled noise. The caller guarantees that position j's prediction
    depends only on noise row j, otherwise the assembled prediction differs
    from the samples that were compared.
    """
    shape = _check_cimle_args(target, k=k, noise_shape=noise_shape, mask=mask, chunk=chunk, select=select)
    if noise is None:
        noise = cimle_noise(k, target.shape[0], shape, generator, target)  # [k, B, *noise_shape]
    elif tuple(noise.shape) != (k, target.shape[0], *shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(k, target.shape[0], *shape)}")
    with torch.no_grad():
        distances = _sample_distances(predict, noise, target.detach(), mask, chunk, vectorize, select, decode_samples)
        chosen, index = _nearest_noise(noise, distances, select)

    pred = predict(chosen)
    _check_pred(pred, target)
    loss = least_squares(pred, target, mask)
    return CIMLEResult(loss=loss, z=chosen, distances=distances, index=index, pred=pred)


def cimle_noise(k: int, batch: int, noise_shape: int | Sequence[int], generator: torch.Generator | None,
                like: Tensor) -> Tensor:
    """cIMLE's noise ``[k, B, *noise_shape]``, drawn on the generator's device, moved to ``like``'s device and dtype."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn((k, batch, *_as_shape(noise_shape)), generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


def _per_position_error(preds: Tensor, target: Tensor, mask: Tensor | None, n_pos: int) -> Tensor:
    """``preds [c, B, ...]`` -> squared error per sample and position ``[c, B, *positions]``,
    averaged over the feature dims, 0 where ``mask`` leaves a position out."""
    err = _error_per_position(preds, target[None], 2 + n_pos)  # [c, B, *positions]
    if mask is not None:
        err = err * mask[None].to(err.dtype)
    return err


def nearest_of_k_amplitude(k: int) -> float:
    """Where cIMLE's nearest-of-k puts a two-mode sampler's modes, as a fraction of the true modes' +-a.

    A sampler drawing +-b with equal odds puts all k samples on one side with odds 2^(1-k), on the
    wrong side half of those times; E min_i (y - s_i)^2 is then least at b = a (1 - 2^(1-k)).
    """
    return 1.0 - 2.0 ** (1 - k)


def gaussian_kl(mu: Tensor, logvar: Tensor, mask: Tensor | None = None, *,
                features: Literal["sum", "mean"] = "sum") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per position, averaged over positions.

    ``mu`` and ``logvar`` are ``(B, *positions, d)``; ``mask`` (optional) is
    ``(B, *positions)`` and selects the positions that count. ``features``:
    ``"sum"`` adds the d per-feature terms (the textbook KL of a position),
    ``"mean"`` averages them, so the result is the mean over all latent features
    of all positions: the Masked VAE paper's ``beta / (2J) sum_j (...)``, whose
    beta = 30 is calibrated for that per-feature scale (d times weaker than "sum").
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu shape {tuple(mu.shape)} and logvar shape {tuple(logvar.shape)} differ")
    if mu.ndim < 2:
        raise ValueError(f"mu must be (B, ..., d), got shape {tuple(mu.shape)}")
    if features not in ("sum", "mean"):
        raise ValueError(f"features must be 'sum' or 'mean', got {features!r}")
    per_feature = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # [B, *positions, d]
    kl = per_feature.sum(dim=-1) if features == "sum" else per_feature.mean(dim=-1)  # [B, *positions]
    if mask is None:
        return kl.mean()
    if tuple(mask.shape) != tuple(kl.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(kl.shape)}")
    weight = mask.to(kl.dtype)
    return (kl * weight).sum() / weight.sum().clamp_min(1.0)
