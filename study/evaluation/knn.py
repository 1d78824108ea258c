"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; similarity is the cosine; each of the k nearest
training points votes for its label with weight ``exp(similarity / T)``
(T = 0.07, as DINO, Caron et al. 2021). Several k are answered from one pass,
as DINO's eval_knn.py reports 10, 20, 100 and 200: the top max(k) neighbours
are found once, sorted, and each k votes with their first k. The test x train
similarity matrix is built in chunks of test rows so memory stays bounded
(``chunk * N_train`` floats at a time).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from study.evaluation.setup import EvaluationError

__all__ = ["DEFAULT_KS", "checked_ks", "knn_predict", "knn_accuracy", "resolve_ks"]

DEFAULT_KS = (10, 20, 100, 200)  # DINO's eval_knn.py; 20 is the k of every k-NN number the study reports


def checked_ks(knn_k, knn_ks) -> tuple[int, ...] | None:
    """The ks asked for, sorted, from ``knn_ks`` or a single ``knn_k`` (None: :data:`DEFAULT_KS`)."""
    if knn_k is not None:
        if knn_ks is not None and tuple(knn_ks) != (knn_k,):
            raise EvaluationError(f"knn_k={knn_k!r} and knn_ks={knn_ks!r} disagree; give knn_ks only")
        knn_ks = (knn_k,)
    if knn_ks is None:
        return None
    ks = (knn_ks,) if isinstance(knn_ks, numbers.Integral) else tuple(knn_ks)
    if not ks or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise EvaluationError(f"k-NN k must be integers >= 1, got {knn_ks!r}; e.g. knn_ks={DEFAULT_KS}")
    return tuple(sorted({int(k) for k in ks}))


def resolve_ks(ks: Sequence[int] | None, n_train: int) -> tuple[tuple[int, ...], str]:
    """``(ks to run, a note naming those left out or "")`` on ``n_train`` training images. ``None`` runs the
    :data:`DEFAULT_KS` up to ``n_train`` (a larger k would be every point, named as a k it is not); a k
    asked for above ``n_train`` is refused."""
    if ks is not None:
        if max(ks) > n_train:
            raise EvaluationError(f"--knn-k {max(ks)} is more neighbours than the {n_train} training images; give "
                                  "at most that (20 is the usual choice)")
        return tuple(ks), ""
    run, left_out = [k for k in DEFAULT_KS if k <= n_train], [str(k) for k in DEFAULT_KS if k > n_train]
    if not run:
        raise EvaluationError(f"the {n_train} training images are fewer than every default k-NN k "
                              f"({', '.join(left_out)}); give --knn-k at most {n_train}")
    return tuple(run), f"  (k {', '.join(left_out)} left out: {n_train} training images)" if left_out else ""


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                k: int = 20, ks: Sequence[int] | None = None, temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024,
                device: str | torch.device | None = None) -> torch.Tensor | dict[int, torch.Tensor]:
    """Predicted labels ``[N_test]`` for ``test_features`` by weighted k-NN vote.

    With ``ks`` (several k): ``{k: predictions}``, each equal to a call with that ``k`` alone.
    """
    wanted = [k] if ks is None else [int(v) for v in ks]
    if not wanted or min(wanted) < 1:
        raise ValueError(f"k must be >= 1, got {k if ks is None else list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels differ in length")
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training feature")
    device = torch.device(device) if device is not None else train_features.device
    train = F.normalize(train_features.to(device, torch.float32), dim=1)
    labels = train_labels.to(device, torch.int64)
    c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    used = {v: min(v, train.shape[0]) for v in wanted}
    most = max(used.values())
    preds: dict[int, list[torch.Tensor]] = {v: [] for v in wanted}
    for start in range(0, test_features.shape[0], chunk):
        test = F.normalize(test_features[start:start + chunk].to(device, torch.float32), dim=1)
        sim = test @ train.T  # [b, N_train]
        top_sim, top_idx = sim.topk(most, dim=1)  # [b, most], sorted: the first k are the k nearest
        weights, votes_for = (top_sim / temperature).exp(), labels[top_idx]
        for v, n in used.items():
            votes = torch.zeros(test.shape[0], c, device=device)
            votes.scatter_add_(1, votes_for[:, :n], weights[:, :n])
            preds[v].append(votes.argmax(dim=1))
    out = {v: torch.cat(p).cpu() if p else torch.zeros(0, dtype=torch.int64) for v, p in preds.items()}
    return out[k] if ks is None else out


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, **kwargs) -> float | dict[int, float]:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_predict`; ``{k: accuracy}`` when given ``ks``."""
    pred = knn_predict(train_features, train_labels, test_features, **kwargs)
    truth = test_labels.cpu()
    if isinstance(pred, dict):
        return {v: (p == truth).float().mean().item() for v, p in pred.items()}
    return (pred == truth).float().mean().item()
