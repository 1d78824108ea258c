"""Weighted k-NN classification on frozen features (the DINO protocol).

Features are L2-normalised; similarity is the cosine; each of the k nearest
training points votes for its label with weight ``exp(similarity / T)``
(k = 20, T = 0.07 by default, as in DINO, Caron et al. 2021). The test x train
similarity matrix is built in chunks of test rows so memory stays bounded
(``chunk * N_train`` floats at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_accuracy"]


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted labels ``[N_test]`` for ``test_features`` by weighted k-NN vote."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
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
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        test = F.normalize(test_features[start:start + chunk].to(device, torch.float32), dim=1)
        sim = test @ train.T  # [b, N_train]
        top_sim, top_idx = sim.topk(k, dim=1)  # [b, k]
        votes = torch.zeros(test.shape[0], c, device=device)
        votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(preds).cpu()


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, **kwargs) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of :func:`knn_predict`."""
    pred = knn_predict(train_features, train_labels, test_features, **kwargs)
    return (pred == test_labels.cpu()).float().mean().item()
