"""Context-Completion (Masked VAE paper, Sec. 4) on the synthetic images, where the answer is known.

The paper masks a COCO object, draws ``k`` inpaintings, detects the classes in them
(``Q``) and compares them with those the context makes plausible (``P``). On
:mod:`study.data.synthetic_images` both are known: under every masked patch of a
class-``c`` image the plausible modes are exactly ``P = {2c, 2c + 1}``, and an oracle
(:func:`train_oracle`, logistic regression on the generator's own patches) names the
mode a completed patch shows, or rejects it (the detector finding nothing). Per masked
patch: precision ``|Q & P| / |Q|`` (0 when ``Q`` is empty, as in the paper), recall
``|Q & P| / 2``, the rejected fraction and whether ``Q`` is empty, averaged over patches
and images (``cc_precision``, ``cc_recall``, ``cc_null_rate``, ``cc_empty_rate``).
Least squares repeats one output ``k`` times, so its recall is at most 1/2 and 0 when
it predicts the conditional mean. Run as the ``completion`` protocol of ``evaluate``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from study.config import num_masked
from study.data.datasets import build_eval_datasets
from study.evaluation import samples as sampling
from study.evaluation.setup import EvaluationError
from study.data.synthetic_images import patchify

__all__ = [
    "REJECT_FRACTION", "CLEAN_QUANTILE", "ORACLE_TRAIN", "ORACLE_TEST", "ORACLE_SEED",
    "PatchOracle", "train_oracle", "to_generator_layout", "completion_metrics", "context_completion",
    "completion_protocol", "check_synthetic", "synthetic_generator",
]

# A completed patch classified as mode m is accepted iff ||x - mode_m|| <= max(REJECT_FRACTION * d_mean, q_clean):
# d_mean is the distance from a mode to its class's conditional mean (least squares' optimum), q_clean the
# CLEAN_QUANTILE of held-out clean noisy patches' distance to their mode (the noise floor). So the conditional
# mean itself is rejected and a clean noisy patch accepted; train_oracle measures both on held-out data.
REJECT_FRACTION = 0.5
CLEAN_QUANTILE = 0.999
ORACLE_TRAIN = 20_000
ORACLE_TEST = 10_000
ORACLE_SEED = 0
ORACLE_L2 = 1e-4


@dataclass
class PatchOracle:
    """A trained patch classifier over the generator's ``2K`` modes plus the rejection radius."""

    generator: object  # SyntheticImageGenerator
    weight: Tensor  # [2K, D]
    bias: Tensor  # [2K]
    radius: float
    accuracy: float  # held-out accuracy on clean noisy patches
    bayes_agreement: float  # held-out agreement with nearest_mode
    clean_null_rate: float  # held-out clean patches rejected
    mean_null_rate: float  # noisy conditional-mean patches rejected

    def predict(self, patches: Tensor) -> Tensor:
        """Mode id ``[...]`` of patches ``[..., C, p, p]``."""
        flat = self.generator.strip(patches).reshape(-1, self.weight.shape[1])  # the distractor says nothing
        return (flat @ self.weight.T + self.bias).argmax(dim=1).reshape(patches.shape[:-3])

    def classify(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """``(mode ids [...], accepted [...] bool)``: accepted = within ``radius`` of the named mode."""
        modes = self.predict(patches)
        templates = self.generator.modes[modes]  # [..., C, p, p]
        dist = (self.generator.strip(patches) - templates).flatten(-3).norm(dim=-1)
        return modes, dist <= self.radius


def check_synthetic(cfg) -> None:
    """Refuse (``EvaluationError``) a config whose data is not the synthetic images."""
    if cfg.data.name != "synthetic":
        raise EvaluationError(f"Context-Completion needs a checkpoint trained on data.name=synthetic (the plausible "
                              f"content under a mask is known only there); this one has data.name="
                              f"{cfg.data.name!r}")


def synthetic_generator(cfg, dataset=None):
    """The :class:`SyntheticImageGenerator` behind a synthetic config's data (from its validation split)."""
    check_synthetic(cfg)
    if dataset is None:
        dataset = build_eval_datasets(cfg)[1]
    return dataset.generator


def train_oracle(generator, *, n_train: int = ORACLE_TRAIN, n_test: int = ORACLE_TEST, seed: int = ORACLE_SEED,
                 reject_fraction: float = REJECT_FRACTION, clean_quantile: float = CLEAN_QUANTILE,
                 l2: float = ORACLE_L2) -> PatchOracle:
    """Fit the oracle on the generator's noisy patches; deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x, y = generator.sample_patches(n_train, g)
    xt, yt = generator.sample_patches(n_test, g)
    x, xt = generator.strip(x), generator.strip(xt)  # the oracle reads the distractor-free part
    m = 2 * generator.num_classes
    d = x[0].numel()
    x, xt = x.reshape(n_train, d).double(), xt.reshape(n_test, d).double()
    w = torch.zeros(m, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight, bias = w.detach().float(), b.detach().float()
    pred = (xt.float() @ weight.T + bias).argmax(dim=1)
    accuracy = float((pred == yt).float().mean())
    test_patches = xt.float().reshape(n_test, *generator.modes.shape[1:])
    bayes = float((pred == generator.nearest_mode(test_patches)).float().mean())

    modes = generator.modes  # [2K, C, p, p]
    labels = torch.arange(generator.num_classes).repeat_interleave(2)
    d_mean = float((modes - generator.class_mean_patch(labels)).flatten(1).norm(dim=1).min())
    clean_dist = (test_patches - modes[yt]).flatten(1).norm(dim=1)
    q_clean = float(torch.quantile(clean_dist, clean_quantile))
    radius = max(reject_fraction * d_mean, q_clean)
    oracle = PatchOracle(generator, weight, bias, radius, accuracy, bayes, 0.0, 0.0)
    _, acc = oracle.classify(test_patches)
    oracle.clean_null_rate = float(1 - acc.float().mean())
    cls = yt // 2
    mean_patches = generator.class_mean_patch(cls) + generator.noise_std * torch.randn(
        test_patches.shape, generator=g)
    _, acc = oracle.classify(mean_patches)
    oracle.mean_null_rate = float(1 - acc.float().mean())
    return oracle


def to_generator_layout(patches: Tensor, patch_size: int, in_chans: int) -> Tensor:
    """Model patches ``[..., p*p*C]`` (flattened as (row, col, channel)) -> ``[..., C, p, p]``."""
    return patches.unflatten(-1, (patch_size, patch_size, in_chans)).movedim(-1, -3)


def completion_metrics(oracle: PatchOracle, completions: Tensor, mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-image Context-Completion metrics.

    ``completions [k, B, N, C, p, p]`` (pixel space; only masked positions are
    read), ``mask [B, N]`` bool (the same count per row), ``labels [B]`` class
    ids. Returns per-image tensors ``[B]``: ``precision``, ``recall``,
    ``null_rate``, ``empty_rate`` (see the module docstring)."""
    k, b = completions.shape[:2]
    if completions.shape[1:3] != mask.shape or labels.shape != (b,):
        raise ValueError(f"completions [k, B, N, C, p, p], mask [B, N], labels [B]; got "
                         f"{tuple(completions.shape)}, {tuple(mask.shape)}, {tuple(labels.shape)}")
    nm = int(mask[0].sum())
    if not bool((mask.sum(1) == nm).all()) or nm == 0:
        raise ValueError("every image must mask the same, non-zero number of patches")
    slots = completions[:, mask].reshape(k, b, nm, *completions.shape[3:])  # [k, B, Nm, C, p, p]
    modes, accepted = oracle.classify(slots)  # [k, B, Nm]
    m = 2 * oracle.generator.num_classes
    hits = torch.nn.functional.one_hot(modes, m).bool() & accepted[..., None]  # [k, B, Nm, M]
    found = hits.any(dim=0)  # [B, Nm, M]: Q_ij
    plausible = torch.zeros(b, m, dtype=torch.bool)
    plausible[torch.arange(b), 2 * labels] = True
    plausible[torch.arange(b), 2 * labels + 1] = True
    n_found = found.sum(-1).float()  # [B, Nm]
    tp = (found & plausible[:, None]).sum(-1).float()
    precision = torch.where(n_found > 0, tp / n_found.clamp_min(1), torch.zeros_like(tp))
    recall = tp / plausible.sum(-1, keepdim=True).float()
    null = 1 - accepted.float().mean(dim=0)  # [B, Nm]
    empty = (n_found == 0).float()
    return {"precision": precision.mean(1), "recall": recall.mean(1), "null_rate": null.mean(1),
            "empty_rate": empty.mean(1)}


def context_completion(model, cfg, oracle: PatchOracle, *, k: int | None = None, n_images: int | None = None,
                       seed: int | None = None, dataset=None, device="cpu") -> dict[str, float]:
    """Mean Context-Completion metrics of ``model`` on fixed validation images with fixed masks
    (``cfg.mask``; :func:`study.evaluation.samples.fixed_batch`): ``k`` completions per image
    (default ``min(cimle.k, 8)``; least squares repeats its one output)."""
    if dataset is None:
        dataset = build_eval_datasets(cfg)[1]
    seed = sampling.SEED if seed is None else seed
    k = sampling.num_samples(cfg) if k is None else int(k)
    batch = sampling.fixed_batch(cfg, len(dataset) if n_images is None else n_images, seed, dataset)
    model.to(device)
    patches = sampling.model_samples(model, batch, k, seed, device)  # [k, B, N, D] pixel space
    model.cpu()
    comp = to_generator_layout(patches, cfg.model.patch_size, cfg.model.in_chans)
    res = completion_metrics(oracle, comp, batch.mask, batch.labels)
    out = {name: float(v.mean()) for name, v in res.items()}
    out.update(k=k, images=int(batch.images.shape[0]))
    return out


@torch.no_grad()
def masked_losses(model, cfg, dataset, *, n_images: int | None = None, seed: int | None = None,
                  device="cpu") -> dict[str, float]:
    """Per-pixel squared error on the masked patches of fixed validation images (pixel targets):
    ``masked_loss`` of the deterministic reconstruction (least squares' prediction; z = 0 otherwise),
    comparable with ``bayes_floor``; ``masked_loss_nearest`` of the nearest of ``cimle.k`` samples per
    masked patch (per-token cIMLE's loss), comparable with ``mode_floor``."""
    seed = sampling.SEED if seed is None else seed
    batch = sampling.fixed_batch(cfg, len(dataset) if n_images is None else n_images, seed, dataset)
    model.to(device)
    target = model.patchify(batch.images.to(device)).float()  # [B, N, D] pixels
    mask = batch.mask.to(device)
    recon = model.reconstruct(batch.images.to(device), mask)
    samples = sampling.model_samples(model, batch, max(1, int(cfg.cimle.k)), seed, device).to(device)  # [k, B, N, D]
    model.cpu()
    if model.norm_pix_loss:  # reconstruct() answers in target space
        recon = model.denormalize_pred(recon, batch.images.to(device))
    err = (recon - target).pow(2).mean(-1)  # [B, N]
    nearest = (samples - target).pow(2).mean(-1).min(dim=0).values  # [B, N]
    return {"masked_loss": float(err[mask].mean()), "masked_loss_nearest": float(nearest[mask].mean())}


@torch.no_grad()
def true_completions(generator, dataset, batch, k: int, seed: int = 0) -> Tensor:
    """``k`` draws from the true conditional of ``batch``'s masked patches, in the model's patch layout
    ``[k, B, N, p*p*C]`` (visible patches kept): same class and distractor, fresh signs and noise."""
    data = dataset.data
    idx = batch.indices
    g = torch.Generator().manual_seed(seed)
    b, n = len(idx), generator.num_patches
    out = []
    for _ in range(k):
        signs = torch.randint(0, 2, (b, n), generator=g, dtype=torch.int8) * 2 - 1
        noise = torch.randn(b, generator.in_chans, generator.img_size, generator.img_size, generator=g)
        imgs = generator.render(data.labels[idx], signs, data.distractors[idx], noise)
        imgs = torch.where(_pixel_mask(batch.mask, generator), imgs, batch.images)
        p = patchify(imgs, generator.patch_size)  # [B, N, C, p, p]
        out.append(p.permute(0, 1, 3, 4, 2).reshape(b, n, -1))  # the model's (row, col, channel) layout
    return torch.stack(out)


def _pixel_mask(mask: Tensor, generator) -> Tensor:
    """``[B, N]`` patch mask -> ``[B, 1, H, W]`` pixel mask."""
    p, grid = generator.patch_size, generator.grid
    m = mask.reshape(-1, grid, grid).repeat_interleave(p, 1).repeat_interleave(p, 2)
    return m[:, None]


def completion_protocol(cfg, models: dict, *, device="cpu", k: int | None = None, n_images: int | None = None,
                        seed: int | None = None) -> list[dict]:
    """Rows for the ``completion`` protocol: oracle quality once, ``cc_*`` per model in ``models``."""
    check_synthetic(cfg)
    dataset = build_eval_datasets(cfg)[1]
    generator = synthetic_generator(cfg, dataset)
    t0 = time.perf_counter()
    oracle = train_oracle(generator)
    oracle_seconds = time.perf_counter() - t0
    base = {"cc_radius": oracle.radius, "cc_reject_fraction": REJECT_FRACTION, "oracle_train": ORACLE_TRAIN,
            "oracle_test": ORACLE_TEST}
    rows = []
    for metric, value in (("oracle_accuracy", oracle.accuracy), ("oracle_bayes_agreement", oracle.bayes_agreement),
                          ("oracle_clean_null_rate", oracle.clean_null_rate),
                          ("oracle_mean_null_rate", oracle.mean_null_rate), ("oracle_seconds", oracle_seconds)):
        rows.append({"encoder": "pretrained", "metric": metric, "value": value, **base})
    if hasattr(generator, "bayes_floor"):  # a generator that knows E[y | x] reports the floors it implies
        n_visible = cfg.num_patches - num_masked(cfg.mask.ratio, cfg.num_patches)
        for metric, value in (("bayes_floor", generator.bayes_floor(n_visible)),
                              ("mode_floor", generator.mode_floor(n_visible))):
            rows.append({"encoder": "pretrained", "metric": metric, "value": value, **base})
    for enc_name, model in models.items():
        for metric, value in masked_losses(model, cfg, dataset, n_images=n_images, seed=seed, device=device).items():
            rows.append({"encoder": enc_name, "metric": metric, "value": value, **base})
        t0 = time.perf_counter()
        res = context_completion(model, cfg, oracle, k=k, n_images=n_images, seed=seed, dataset=dataset,
                                 device=device)
        extra = {**base, "cc_k": res["k"], "cc_images": res["images"]}
        for name in ("precision", "recall", "null_rate", "empty_rate"):
            rows.append({"encoder": enc_name, "metric": f"cc_{name}", "value": res[name], **extra})
        rows.append({"encoder": enc_name, "metric": "completion_seconds", "value": time.perf_counter() - t0,
                     **extra})
    return rows


if __name__ == "__main__":  # pragma: no cover - quick look at the oracle
    from study.config import load_config

    _cfg = load_config("experiments/configs/synthetic.yaml")
    _o = train_oracle(synthetic_generator(_cfg))
    print(f"accuracy {_o.accuracy:.4f} bayes {_o.bayes_agreement:.4f} radius {_o.radius:.3f} "
          f"clean null {_o.clean_null_rate:.4f} mean null {_o.mean_null_rate:.4f} "
          f"noise floor {_o.generator.noise_std * math.sqrt(_o.generator.modes[0].numel()):.3f}")
