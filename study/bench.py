"""Training-step benchmark: LS, cIMLE at several k and the Masked VAE, against transformers' ViTMAE.

    python -m study bench --config experiments/configs/cpu-small.yaml --out results/bench/cpu-small.json
    python -m study bench --config experiments/configs/in100-vit-t.yaml --set device=cpu --set precision=fp32 \\
        --batch 8 --k 1,2,4,8 --steps 3 --warmup 1 --out results/bench/in100-vit-t-cpu.json

What one run measures, all on synthetic random images of the config's size,
on the config's device (``auto``: CUDA when available) and precision:

* **Step time** of every variant: mask + forward + backward + AdamW step +
  ``zero_grad`` (what :mod:`study.train` does per batch, without the data
  loader). Variants are timed *round-robin* (one step of each, then the next
  round), so that load from other processes hits all of them alike; the
  median over the warm rounds is reported. Ratios are formed within the run.
* **transformers' ViTMAEForPreTraining** at the identical configuration (same
  image/patch/channels, widths, depths, heads, MLP sizes, mask ratio,
  norm_pix_loss, batch, AdamW with the same decay rule), SDPA attention.
* **cIMLE cost model** ``E_fb + D_fb + k * D_f``, from components timed in the
  same rounds: ``E_fb`` encoder forward + backward on the visible patches;
  ``D_fb`` decoder ``prefix`` + ``suffix`` forward + backward (with the noise
  input and the loss, gradient flowing back to the encoder's output);
  ``D_f`` one no-gradient pass of ``decoder.suffix`` (blocks ``j ..`` where
  the noise enters, norm, prediction) at batch B plus its distance to the
  target. With late noise (``noise.block = j > 0``) the blocks before ``j``
  run once per step, with gradient, and are part of ``D_fb``; only the suffix
  is repeated per sample, so ``D_f`` is the suffix alone, not the whole
  decoder. The model leaves out the optimizer step, the mask and the target;
  ``cimle_vs_cost_model_with_optimizer`` adds the separately timed AdamW step.
* **Peak memory** of one step per variant, taken before the timing on a
  steady step (every optimizer is primed with one step on zero gradients
  when it is built, so its state exists). CUDA: ``torch.cuda.max_memory_allocated``
  over the step (it includes weights, optimizer state and inputs). CPU: the
  bytes live in PyTorch's CPU allocator, from ``torch.profiler`` with
  ``profile_memory=True`` (the allocator's running total at every allocation
  and free during the step, maximum minus the level at the start), plus the
  bytes of weights, buffers, optimizer state and the input batch that exist
  before the step. Memory that libraries allocate outside PyTorch's allocator
  (oneDNN / MKL scratch buffers, Python objects) is not counted.
* **Selection memory**: the peak of one ``study.objectives.cimle`` call under
  ``torch.no_grad`` (the selection, plus one no-gradient decode of the chosen
  sample) over a grid of k and ``chunk``, measured the same way.
* **Late noise**: cIMLE at ``late_k`` with the noise entering at decoder block
  0 and at ``decoder_depth - 1`` (the last block; ``--late-blocks`` picks
  others, ``decoder_depth`` = after the last block), each step against LS.
* **Host syncs**: the memory step of every variant runs under a ``TorchFunctionMode`` that
  records every ``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``,
  ``.numpy()``, ``.nonzero()``, ``.cpu()`` and boolean-mask indexing, with
  the line of study code that made it (each is a device sync on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from study.config import Config, config_to_dict
from study.io import atomic_write_text

__all__ = ["add_arguments", "build_transformers_mae", "count_parameters", "run_bench", "run_from_args"]

DEFAULT_KS = (1, 2, 4, 8, 16)
DEFAULT_SELECTION_KS = (4, 8, 16)
DEFAULT_SELECTION_CHUNKS = (1, 2, 4, 8)

# targets named by the issue; reported in the JSON, never asserted
TARGET_OURS_VS_TRANSFORMERS = 0.8
TARGET_CIMLE_VS_COST_MODEL = 1.1
TARGET_LATE_NOISE_K8_VS_LS = 1.5


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- device / timing


def bench_device(cfg: Config) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available; use --set device=cpu")
    return torch.device(kind)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(cfg: Config, device: torch.device):
    from study.train import _autocast as train_autocast

    return train_autocast(cfg, device)


def _time_round_robin(tasks: dict[str, Callable[[], Any]], steps: int, warmup: int,
                      device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every task up, then ``steps`` rounds of one call of each.

    Returns wall-clock seconds and process CPU seconds (all threads) per call.
    """
    for name, fn in tasks.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        _sync(device)
        _log(f"  warmed {name} ({time.perf_counter() - t0:.2f} s)")
    wall: dict[str, list[float]] = {name: [] for name in tasks}
    cpu: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(steps):
        t_round = time.perf_counter()
        for name, fn in tasks.items():
            _sync(device)
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        _log(f"  round {r + 1}/{steps} ({time.perf_counter() - t_round:.2f} s)")
    return wall, cpu


# --------------------------------------------------------------------------- memory


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence C-level writes to fd 2 (the profiler's start/stop chatter); Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes live in PyTorch's CPU allocator during ``fn()``, above the level at its start.

    From ``torch.profiler(profile_memory=True)``: every allocation and free
    event carries the allocator's running total; the peak is its maximum
    minus the total before the first event. Frees of memory allocated before
    profiling are not seen, so the figure can only overstate the true peak.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = [e for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"]
    if not allocs:
        return 0
    allocs.sort(key=lambda e: e.start_time_ns)
    first = allocs[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return max(0, max(e.extra_fields.total_allocated for e in allocs) - base)


def _state_bytes(*objs: Any) -> int:
    """Bytes of the tensors held by modules (parameters, buffers), optimizers (state) and plain tensors."""
    seen: set[int] = set()
    total = 0

    def add(t: Tensor) -> None:
        nonlocal total
        if isinstance(t, Tensor) and t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for obj in objs:
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
        elif isinstance(obj, Tensor):
            add(obj)
    return total


def measure_memory(fn: Callable[[], Any], device: torch.device, *static: Any) -> tuple[dict, Any]:
    """Peak memory of one call of ``fn`` (see the module docstring for the method) and what ``fn`` returned."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "extra_bytes": int(peak - before), "static_bytes": int(before),
                "method": "torch.cuda.max_memory_allocated"}, out
    base = _state_bytes(*static)
    box: list = []
    try:
        extra = cpu_peak_extra_bytes(lambda: box.append(fn()))
    except Exception as exc:  # noqa: BLE001 - private profiler API; report instead of failing the run
        memo = {"peak_bytes": None, "extra_bytes": None, "static_bytes": None,
                "method": f"unavailable: {type(exc).__name__}: {exc}"}
        return memo, (box[0] if box else fn())
    return {"peak_bytes": int(base + extra), "extra_bytes": int(extra), "static_bytes": int(base),
            "method": "torch.profiler profile_memory (CPU allocator live bytes) + weights/optimizer/input bytes"}, box[0]


# --------------------------------------------------------------------------- host syncs

_SYNC_METHODS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "nonzero", "cpu"}
_STUDY_DIR = str(Path(__file__).resolve().parent)


def _where(frame: traceback.FrameSummary) -> str:
    fname = str(Path(frame.filename).resolve())
    root = str(Path(_STUDY_DIR).parent)
    if "site-packages" + os.sep in fname:
        fname = fname.split("site-packages" + os.sep, 1)[1]
    elif fname.startswith(root + os.sep):
        fname = os.path.relpath(fname, root)
    return f"{fname}:{frame.lineno} ({frame.name}: {(frame.line or '').strip()[:80]})"


def _caller() -> str:
    """The innermost frame that made the call (leaving out torch's dispatch glue and this file)."""
    here = str(Path(__file__).resolve())
    skip = (os.sep + os.path.join("torch", "overrides.py"), os.sep + os.path.join("torch", "_tensor.py"),
            os.sep + os.path.join("torch", "utils", "_device.py"))
    for frame in reversed(traceback.extract_stack()[:-2]):
        fname = str(Path(frame.filename).resolve())
        if fname != here and not fname.endswith(skip):
            return _where(frame)
    return "?"


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
        if hit:
            self.hits[f"{name} @ {_caller()}"] += 1
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- transformers


def _import_transformers():
    try:
        import transformers
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError as exc:
        raise ImportError(
            "the benchmark against Hugging Face needs transformers: pip install -e '.[bench]' "
            f"(or pass --no-transformers) [{exc}]"
        ) from exc
    return transformers, ViTMAEConfig, ViTMAEForPreTraining


def build_transformers_mae(cfg: Config) -> nn.Module:
    """transformers' ``ViTMAEForPreTraining`` with our config's sizes, SDPA attention, LayerNorm eps 1e-6."""
    _, ViTMAEConfig, ViTMAEForPreTraining = _import_transformers()
    m = cfg.model
    hf_cfg = ViTMAEConfig(
        hidden_size=m.embed_dim, num_hidden_layers=m.depth, num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
        image_size=m.img_size, patch_size=m.patch_size, num_channels=m.in_chans, qkv_bias=True,
        decoder_num_attention_heads=m.decoder_heads, decoder_hidden_size=m.decoder_dim,
        decoder_num_hidden_layers=m.decoder_depth, decoder_intermediate_size=int(m.decoder_dim * m.mlp_ratio),
        mask_ratio=cfg.mask.ratio, norm_pix_loss=m.norm_pix_loss,
    )
    hf_cfg._attn_implementation = "sdpa"
    return ViTMAEForPreTraining(hf_cfg)


def _hf_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The rule of :func:`study.train._param_groups`: no decay on biases, norms, tokens, position embeddings."""
    skip = ("cls_token", "mask_token", "position_embeddings", "decoder_pos_embed")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and not name.endswith(".bias") and not name.endswith(skip) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


def count_parameters(model: nn.Module, groups: dict[str, str] | None = None) -> dict:
    """Total and trainable parameter counts, and per top-level group (``groups``: prefix -> label)."""
    out = {"total": 0, "trainable": 0, "frozen": 0, "groups": {}}
    for name, p in model.named_parameters():
        n = p.numel()
        out["total"] += n
        out["trainable" if p.requires_grad else "frozen"] += n
        label = name.split(".")[0]
        if groups:
            label = next((lab for pre, lab in groups.items() if name.startswith(pre)), label)
        out["groups"][label] = out["groups"].get(label, 0) + n
    return out


_OUR_GROUPS = {"encoder.": "encoder", "decoder.decoder_noise": "noise input", "decoder.": "decoder",
               "variational_encoder.": "variational encoder"}
_HF_GROUPS = {"vit.": "encoder", "decoder.": "decoder"}


# --------------------------------------------------------------------------- variants


def _with(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with fields of its sections replaced: ``_with(cfg, noise={"block": 3})``."""
    top = {k: v for k, v in sections.items() if not isinstance(v, dict)}
    nested = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items() if isinstance(v, dict)}
    return dataclasses.replace(cfg, **top, **nested)


def _prime_optimizer(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Create the optimizer state (one step on zero gradients) so that the first real step is a steady one."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


class _Trainer:
    """One of our models with its AdamW (the rule of study.train), stepping on a fixed batch."""

    def __init__(self, cfg: Config, device: torch.device, imgs: Tensor, compile_model: bool) -> None:
        from study.masking import build_mask_generator
        from study.models import build_model
        from study.train import _param_groups

        self.cfg = cfg
        self.device = device
        self.imgs = imgs
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(device)
        self.model.train()
        lr = cfg.optim.blr * imgs.shape[0] / 256
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, cfg), lr=lr,
                                           betas=(cfg.optim.beta1, cfg.optim.beta2))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
        self.make_mask = build_mask_generator(cfg.mask, grid)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000)
        self.net: nn.Module = torch.compile(self.model) if compile_model else self.model
        _prime_optimizer(self.model, self.optimizer)

    def step_fn(self, cfg: Config | None = None, eager: bool = False) -> Callable[[], Tensor]:
        """One training step; ``cfg`` (same architecture) swaps e.g. ``cimle.k`` on the shared model."""
        model, opt, scaler, imgs = self.model, self.optimizer, self.scaler, self.imgs
        net = model if eager else self.net
        use = cfg or self.cfg

        def step() -> Tensor:
            model.cfg = use
            mask = self.make_mask(imgs.shape[0], generator=self.gen, device=self.device)  # [B, N]
            with _autocast(use, self.device):
                out = net(imgs, mask, generator=self.gen)
            return _optimizer_step(out.loss, scaler, opt)

        return step


def _optimizer_step(loss: Tensor, scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> Tensor:
    """Backward, (scaled) AdamW step and zero_grad: the part of a training step every variant shares."""
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


class _HFTrainer:
    def __init__(self, cfg: Config, device: torch.device, imgs: Tensor, compile_model: bool) -> None:
        torch.manual_seed(cfg.seed)
        self.model = build_transformers_mae(cfg).to(device)
        self.model.train()
        lr = cfg.optim.blr * imgs.shape[0] / 256
        self.optimizer = torch.optim.AdamW(_hf_param_groups(self.model, cfg.optim.weight_decay), lr=lr,
                                           betas=(cfg.optim.beta1, cfg.optim.beta2))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.cfg, self.device, self.imgs = cfg, device, imgs
        self.net: nn.Module = torch.compile(self.model) if compile_model else self.model
        _prime_optimizer(self.model, self.optimizer)

    def step_fn(self, eager: bool = False) -> Callable[[], Tensor]:
        opt, scaler, imgs = self.optimizer, self.scaler, self.imgs
        net = self.model if eager else self.net

        def step() -> Tensor:
            with _autocast(self.cfg, self.device):
                out = net(pixel_values=imgs)
            return _optimizer_step(out.loss, scaler, opt)

        return step


class _Components:
    """Closures for the cost model's parts on one cIMLE model (fixed mask, fixed noise)."""

    def __init__(self, tr: _Trainer) -> None:
        from study.models.mae import mask_indices

        self.tr = tr
        model, imgs, device = tr.model, tr.imgs, tr.device
        gen = torch.Generator().manual_seed(tr.cfg.seed + 17)
        self.mask = tr.make_mask(imgs.shape[0], generator=gen, device=device)  # [B, N]
        self.ids = mask_indices(self.mask, model.num_patches)
        with torch.no_grad(), _autocast(tr.cfg, device):
            self.target = model.target(imgs)  # [B, N, p*p*C]
            latent = model.encoder(imgs, self.ids.keep)  # [B, 1+N_vis, D]
            self.hidden = model.decoder.prefix(latent, self.ids.restore)  # [B, 1+N, Dd]
        self.latent = latent.detach()
        self.grad_latent = torch.randn_like(self.latent)
        self.z = torch.randn((imgs.shape[0], *model.noise_shape(self.ids.num_masked)), generator=gen).to(device)
        # gradients for timing the optimizer step alone (set before, removed after)
        self.grads = [torch.randn_like(p) if p.requires_grad else None for p in model.parameters()]

    def encoder_fb(self) -> None:
        model = self.tr.model
        with _autocast(self.tr.cfg, self.tr.device):
            latent = model.encoder(self.tr.imgs, self.ids.keep)
        latent.backward(self.grad_latent.to(latent.dtype))
        model.zero_grad(set_to_none=True)

    def decoder_fb(self) -> None:
        from study.objectives import least_squares

        model = self.tr.model
        latent = self.latent.detach().requires_grad_(True)  # gradient flows back to the encoder output
        with _autocast(self.tr.cfg, self.tr.device):
            hidden = model.decoder.prefix(latent, self.ids.restore)
            pred = model.decoder.suffix(hidden, self.z, self.mask)
            loss = least_squares(pred, self.target, self.mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def decoder_f(self) -> None:
        from study.objectives import per_example_squared_error

        with torch.no_grad(), _autocast(self.tr.cfg, self.tr.device):
            pred = self.tr.model.decoder.suffix(self.hidden, self.z, self.mask)
            per_example_squared_error(pred, self.target, self.mask)

    def selection(self, k: int, chunk: int | None) -> Callable[[], None]:
        """One ``study.objectives.cimle`` call under no_grad (selection + one no-grad decode of the choice)."""
        from study.objectives import cimle

        model = self.tr.model
        gen = torch.Generator().manual_seed(5)

        def run() -> None:
            with torch.no_grad(), _autocast(self.tr.cfg, self.tr.device):
                cimle(lambda z: model.decoder.suffix(self.hidden, z, self.mask), self.target, k=k,
                      noise_shape=model.noise_shape(self.ids.num_masked), mask=self.mask, chunk=chunk,
                      generator=gen)

        return run

    def optimizer_step(self) -> None:
        model, opt = self.tr.model, self.tr.optimizer
        for p, g in zip(model.parameters(), self.grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- the run


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b > 0:
        return None
    return float(a / b)


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def run_bench(
    cfg: Config,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch: int | None = None,
    steps: int = 20,
    warmup: int = 3,
    transformers: bool = True,
    compile_models: bool = False,
    selection_ks: Sequence[int] = DEFAULT_SELECTION_KS,
    selection_chunks: Sequence[int] = DEFAULT_SELECTION_CHUNKS,
    late_noise: bool = True,
    late_k: int = 8,
    late_blocks: Sequence[int] | None = None,
    selection_block: int | None = None,
    selection_timing: bool = True,
    config_path: str | None = None,
) -> dict:
    """Run the benchmark (see the module docstring) and return the JSON-ready result."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"--k must list ints >= 1, got {ks}")
    if transformers:
        _import_transformers()  # fail before any work when the bench extra is missing
    device = bench_device(cfg)
    batch = int(batch or cfg.optim.batch_size)
    cfg = _with(cfg, compile=compile_models, optim={"batch_size": batch})
    m = cfg.model
    t_start = time.perf_counter()
    late = sorted(set(_late_blocks(cfg) if late_blocks is None else late_blocks)) if late_noise else []
    bad = [b for b in late if not 0 <= b <= m.decoder_depth]
    if bad:
        raise ValueError(f"late noise blocks must lie in [0, decoder_depth={m.decoder_depth}], got {bad}")
    sel_block = cfg.noise.block if selection_block is None else int(selection_block)
    if not 0 <= sel_block <= m.decoder_depth:
        raise ValueError(f"selection block must lie in [0, decoder_depth={m.decoder_depth}], got {sel_block}")

    gen = torch.Generator().manual_seed(cfg.seed)
    imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size, generator=gen).to(device)  # [B, C, H, W]

    compile_info: dict = {"requested": compile_models}
    trainers: dict[str, Any] = {}

    def build_all(compile_now: bool) -> None:
        trainers.clear()
        trainers["ls"] = _Trainer(_with(cfg, objective="ls"), device, imgs, compile_now)
        trainers[f"cimle@{cfg.noise.block}"] = _Trainer(_with(cfg, objective="cimle"), device, imgs, compile_now)
        trainers["mvae"] = _Trainer(_with(cfg, objective="mvae"), device, imgs, compile_now)
        for b in late + [sel_block]:
            key = f"cimle@{b}"
            if key not in trainers:
                trainers[key] = _Trainer(_with(cfg, objective="cimle", noise={"block": b}), device, imgs,
                                         compile_now)
        if transformers:
            trainers["hf"] = _HFTrainer(cfg, device, imgs, compile_now)

    build_all(compile_models)
    if compile_models:
        t0 = time.perf_counter()
        try:
            trainers["ls"].step_fn()()
            if "hf" in trainers:
                trainers["hf"].step_fn()()
            compile_info.update(ok=True, first_step_seconds=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - reported, then the run goes on in eager mode
            compile_info.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
            _log(f"torch.compile failed, running eager: {compile_info['error'][:300]}")
            cfg = _with(cfg, compile=False)
            build_all(False)

    # ---- variants: (name, trainer key, cfg for the forward, row info)
    cimle_main = f"cimle@{cfg.noise.block}"
    variants: dict[str, tuple[Callable[[], Tensor], dict, Any]] = {}

    def add_variant(name: str, key: str, row: dict, fwd_cfg: Config | None = None) -> None:
        tr = trainers[key]
        fn = tr.step_fn(fwd_cfg) if isinstance(tr, _Trainer) else tr.step_fn()
        variants[name] = (fn, row, tr)

    add_variant("ls", "ls", {"objective": "ls", "k": None, "noise_block": None})
    for k in ks:
        add_variant(f"cimle k={k}", cimle_main,
                    {"objective": "cimle", "k": k, "noise_block": cfg.noise.block, "chunk": cfg.cimle.chunk},
                    _with(trainers[cimle_main].cfg, cimle={"k": k}))
    add_variant("mvae", "mvae", {"objective": "mvae", "k": None, "noise_block": cfg.noise.block})
    late_rows_spec: list[tuple[int, str]] = []
    for b in late:
        name = f"cimle k={late_k}" if b == cfg.noise.block and late_k in ks else f"cimle k={late_k} block={b}"
        if name not in variants:
            add_variant(name, f"cimle@{b}",
                        {"objective": "cimle", "k": late_k, "noise_block": b, "chunk": cfg.cimle.chunk},
                        _with(trainers[f"cimle@{b}"].cfg, cimle={"k": late_k}))
        late_rows_spec.append((b, name))
    if transformers:
        add_variant("transformers ViTMAE", "hf", {"objective": "ls (transformers)", "k": None, "noise_block": None})

    # ---- cost-model components, timed in the same rounds
    comps: dict[int, _Components] = {}
    for b in sorted({cfg.noise.block} | {b for b, _ in late_rows_spec}):
        comps[b] = _Components(trainers[f"cimle@{b}"])
    sel_comp = comps[sel_block] if sel_block in comps else _Components(trainers[f"cimle@{sel_block}"])
    main = comps[cfg.noise.block]
    comp_tasks: dict[str, Callable[[], Any]] = {"E_fb": main.encoder_fb, "optimizer": main.optimizer_step}
    for b, c in comps.items():
        comp_tasks[f"D_fb@{b}"] = c.decoder_fb
        comp_tasks[f"D_f@{b}"] = c.decoder_f
    kmax = ks[-1]
    sel_name = f"selection k={kmax}@{cfg.noise.block}"
    if selection_timing:
        comp_tasks[sel_name] = main.selection(kmax, cfg.cimle.chunk)

    # ---- memory and host syncs: one step per variant before the timing (optimizers are primed, so it is a
    # steady step); on CPU the profiler slows it, which is why it is not timed
    if compile_info.get("ok"):  # compile every variant (each cIMLE k is its own graph) before measuring
        _log("bench: compiling every variant")
        for fn, _, _ in variants.values():
            fn()
    _log("bench: memory and host syncs, one step per variant")
    memos: dict[str, tuple[dict, float, dict]] = {}
    for name, (fn, info, tr) in variants.items():
        counter = SyncCounter()
        with (counter if not compile_info.get("ok") else contextlib.nullcontext()):
            memo, loss = measure_memory(fn, device, tr.model, tr.optimizer, imgs)
        if compile_info.get("ok") and isinstance(tr, _Trainer):  # count on the eager model
            step = tr.step_fn(tr.model.cfg, eager=True)
            with counter:
                step()
        memos[name] = (memo, float(loss), dict(sorted(counter.hits.items())))

    _log(f"bench: {len(variants)} variants + {len(comp_tasks)} components, batch {batch}, device {device}, "
         f"{steps} rounds after {warmup} warm-up")
    tasks = {name: v[0] for name, v in variants.items()} | {f"[{n}]": fn for n, fn in comp_tasks.items()}
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    times, cpu_times = _time_round_robin(tasks, steps, warmup, device)
    med = {name: _median(ts) for name, ts in times.items()}
    cpu_med = {name: _median(ts) for name, ts in cpu_times.items()}
    comp = {n: med[f"[{n}]"] for n in comp_tasks}

    rows = []
    for name, (fn, info, tr) in variants.items():
        memo, loss, _ = memos[name]
        rows.append({
            "name": name, **info,
            "step_s": med[name], "step_s_min": min(times[name]), "step_cpu_s": cpu_med[name],
            "step_s_all": times[name],
            "images_per_s": batch / med[name],
            "peak_bytes": memo["peak_bytes"], "peak_extra_bytes": memo["extra_bytes"],
            "static_bytes": memo["static_bytes"], "memory_method": memo["method"],
            "loss": loss, "loss_finite": bool(math.isfinite(loss)),
        })
    by_name = {r["name"]: r for r in rows}
    ls_s = med["ls"]

    # ---- cost model
    def cost(k: int, b: int) -> float:
        return comp["E_fb"] + comp[f"D_fb@{b}"] + k * comp[f"D_f@{b}"]

    cimle_vs_cost, cimle_vs_cost_opt, cimle_vs_ls = {}, {}, {}
    for k in ks:
        r = by_name[f"cimle k={k}"]
        r["cost_model_s"] = cost(k, cfg.noise.block)
        r["cost_model_with_optimizer_s"] = r["cost_model_s"] + comp["optimizer"]
        cimle_vs_cost[str(k)] = _ratio(r["step_s"], r["cost_model_s"])
        cimle_vs_cost_opt[str(k)] = _ratio(r["step_s"], r["cost_model_with_optimizer_s"])
        cimle_vs_ls[str(k)] = _ratio(r["step_s"], ls_s)
        r["vs_ls"] = cimle_vs_ls[str(k)]
        r["vs_cost_model"] = cimle_vs_cost[str(k)]
    for r in rows:
        r.setdefault("vs_ls", _ratio(r["step_s"], ls_s))
        r["host_syncs"] = sum(memos[r["name"]][2].values())
    ls_model = comp["E_fb"] + comp[f"D_fb@{cfg.noise.block}"]
    sel_model = (kmax + 1) * comp[f"D_f@{cfg.noise.block}"]

    # ---- late noise
    late_rows = []
    for b, name in late_rows_spec:
        r = by_name[name]
        c = cost(late_k, b)
        late_rows.append({
            "noise_block": b, "k": late_k, "decoder_depth": m.decoder_depth,
            "where": ("input (block 0)" if b == 0 else "last decoder block" if b == m.decoder_depth - 1
                      else "after the last block" if b == m.decoder_depth else f"block {b}"),
            "step_s": r["step_s"], "ls_step_s": ls_s, "vs_ls": _ratio(r["step_s"], ls_s),
            "D_f_s": comp[f"D_f@{b}"], "D_fb_s": comp[f"D_fb@{b}"],
            "cost_model_s": c, "vs_cost_model": _ratio(r["step_s"], c),
            "suffix_blocks": m.decoder_depth - b,
        })
        r.setdefault("cost_model_s", c)
        r.setdefault("vs_cost_model", _ratio(r["step_s"], c))

    # ---- the same ratios, robust to load from other processes
    def ratio_sets(src: dict[str, list[float]]) -> tuple[dict, dict]:
        """(paired: median over rounds of the per-round ratio, medians: ratio of the medians) of ``src``."""
        def rounds(name: str) -> list[float]:
            return src[name] if name in src else src[f"[{name}]"]

        def model_rounds(k: int, b: int) -> list[float]:
            return [e + d + k * f for e, d, f in zip(rounds("E_fb"), rounds(f"D_fb@{b}"), rounds(f"D_f@{b}"))]

        def both(num: list[float], den: list[float]) -> tuple[float | None, float | None]:
            paired = [n / d for n, d in zip(num, den) if d > 0]
            return (_median(paired) if paired else None), _ratio(_median(num), _median(den))

        out: tuple[dict, dict] = ({}, {})
        pairs = {"cimle_vs_cost_model": {}, "cimle_vs_ls": {}, "late_noise_vs_ls": {}}
        for k in ks:
            pairs["cimle_vs_cost_model"][str(k)] = both(rounds(f"cimle k={k}"), model_rounds(k, cfg.noise.block))
            pairs["cimle_vs_ls"][str(k)] = both(rounds(f"cimle k={k}"), rounds("ls"))
        for b, name in late_rows_spec:
            pairs["late_noise_vs_ls"][str(b)] = both(rounds(name), rounds("ls"))
        pairs["mvae_vs_ls"] = both(rounds("mvae"), rounds("ls"))
        if transformers:
            pairs["ours_vs_transformers"] = both(rounds("ls"), rounds("transformers ViTMAE"))
        for key, val in pairs.items():
            if isinstance(val, dict):
                out[0][key] = {kk: v[0] for kk, v in val.items()}
                out[1][key] = {kk: v[1] for kk, v in val.items()}
            else:
                out[0][key], out[1][key] = val
        return out

    paired_wall, _ = ratio_sets(times)
    _, cpu_ratios = ratio_sets(cpu_times)
    for r in late_rows:
        r["vs_ls_paired"] = paired_wall["late_noise_vs_ls"][str(r["noise_block"])]
        r["vs_ls_cpu_time"] = cpu_ratios["late_noise_vs_ls"][str(r["noise_block"])]

    # ---- transformers
    params = {"ours_ls": count_parameters(trainers["ls"].model, _OUR_GROUPS),
              "ours_cimle": count_parameters(trainers[cimle_main].model, _OUR_GROUPS),
              "ours_mvae": count_parameters(trainers["mvae"].model, _OUR_GROUPS)}
    ours_vs_hf = None
    hf_info: dict = {"used": transformers}
    if transformers:
        import transformers as tf_mod

        hf_model = trainers["hf"].model
        params["transformers"] = count_parameters(hf_model, _HF_GROUPS)
        ours_vs_hf = _ratio(ls_s, med["transformers ViTMAE"])
        diff = params["ours_ls"]["total"] - params["transformers"]["total"]
        params["ls_minus_transformers"] = diff
        params["explanation"] = (
            "identical counts: same tensors (our fused qkv = their q/k/v; frozen sin-cos position embeddings "
            "are parameters with requires_grad=False in both)" if diff == 0 else
            "counts differ; see the per-group counts"
        ) + ("; cIMLE adds the noise input (Linear(noise.dim, decoder_dim, bias=False) for 'add', "
             "adaLN maps for 'adaln'), the Masked VAE adds its variational encoder")
        hf_info.update(version=tf_mod.__version__, attn_implementation=hf_model.config._attn_implementation,
                       step_s=med["transformers ViTMAE"])

    # ---- selection memory
    selection = _selection_memory(sel_comp, device, selection_ks, selection_chunks, sel_block)

    # ---- host syncs (counted during the memory step of every variant)
    syncs = {name: memo[2] for name, memo in memos.items() if name != "transformers ViTMAE"}

    # ---- targets (reported, not asserted), on the primary ratios and on the robust ones
    late_last = next((r for r in late_rows if r["noise_block"] == m.decoder_depth - 1), None)

    def judge(ratios: dict, late_key: str) -> dict:
        ovt = ratios.get("ours_vs_transformers")
        cvc = [v for v in ratios["cimle_vs_cost_model"].values() if v is not None]
        late = None if late_last is None else late_last[late_key]
        return {
            "ours_ls_vs_transformers <= 0.8": None if ovt is None else ovt <= TARGET_OURS_VS_TRANSFORMERS,
            "cimle_vs_cost_model <= 1.1 (every k)": all(v <= TARGET_CIMLE_VS_COST_MODEL for v in cvc),
            f"late noise (last decoder block) k={late_k} vs ls <= 1.5": (
                None if late is None else late <= TARGET_LATE_NOISE_K8_VS_LS),
        }

    primary = {"ours_vs_transformers": ours_vs_hf, "cimle_vs_cost_model": cimle_vs_cost}
    targets = {
        "median_wall (primary)": judge(primary, "vs_ls"),
        "paired_wall": judge(paired_wall, "vs_ls_paired"),
        "cpu_time": judge(cpu_ratios, "vs_ls_cpu_time"),
        "selection memory grows with chunk, not k": selection.get("verdict", {}).get("grows_with_chunk_not_k"),
    }

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_before_timing": load_before,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    result = {
        "schema": 1,
        "config_path": config_path,
        "config": config_to_dict(cfg),
        "settings": {
            "batch": batch, "steps": steps, "warmup": warmup, "ks": ks, "precision": cfg.precision,
            "compile": compile_info, "transformers": transformers, "late_k": late_k,
            "late_blocks": [b for b, _ in late_rows_spec], "selection_ks": list(selection_ks),
            "selection_chunks": list(selection_chunks), "selection_block": sel_block,
            "selection_timing": selection_timing, "timing": "round-robin over variants; median of warm rounds",
            "images": "synthetic N(0, 1), fixed batch", "wall_seconds": None,
        },
        "environment": env,
        "rows": rows,
        "components": {
            "E_fb_s": comp["E_fb"],
            "D_fb_s": {str(b): comp[f"D_fb@{b}"] for b in comps},
            "D_f_s": {str(b): comp[f"D_f@{b}"] for b in comps},
            "optimizer_s": comp["optimizer"],
            "selection": None if not selection_timing else {
                "k": kmax, "noise_block": cfg.noise.block, "chunk": cfg.cimle.chunk,
                "seconds": comp[sel_name], "model_s": sel_model, "vs_model": _ratio(comp[sel_name], sel_model),
                "definition": "one study.objectives.cimle call under no_grad: k vmapped suffix passes "
                              "+ distances + one no-grad pass at the chosen noise; model (k+1) * D_f"},
            "definitions": {
                "E_fb": "encoder forward on the visible patches + backward of a fixed output gradient",
                "D_fb": "decoder prefix + suffix forward at the chosen noise, least_squares, backward "
                        "(gradient also to the encoder output); keyed by noise block",
                "D_f": "one no-grad decoder.suffix pass (blocks noise.block .. depth-1, norm, pred) at batch B "
                       "+ its per-example distance; keyed by noise block",
                "optimizer": "one AdamW step of the cIMLE model (all gradients present) + zero_grad",
            },
            "all_s": {n: times[f"[{n}]"] for n in comp_tasks},
        },
        "cost_model": "E_fb + D_fb + k * D_f (no optimizer step, mask or target)",
        "ls_vs_cost_model": _ratio(ls_s, ls_model),
        "ours_vs_transformers": ours_vs_hf,
        "cimle_vs_cost_model": cimle_vs_cost,
        "cimle_vs_cost_model_with_optimizer": cimle_vs_cost_opt,
        "cimle_vs_ls": cimle_vs_ls,
        "mvae_vs_ls": _ratio(med["mvae"], ls_s),
        "robust_ratios": {
            "paired_wall": paired_wall,
            "cpu_time": cpu_ratios,
            "note": "paired_wall: median over rounds of the ratio within each round (variants of a round run "
                    "back to back, so slow load changes cancel); cpu_time: ratio of the median process CPU "
                    "seconds (all threads, includes OpenMP spin-waiting), less sensitive to time slicing",
        },
        "late_noise": late_rows,
        "selection_memory": selection,
        "parameters": params,
        "transformers": hf_info,
        "host_syncs": syncs,
        "targets": targets,
    }
    result["settings"]["wall_seconds"] = time.perf_counter() - t_start
    return result


def _late_blocks(cfg: Config) -> list[int]:
    """Noise at the decoder input and at the last decoder block (the same block when the depth is 1)."""
    d = cfg.model.decoder_depth
    return sorted({0, d - 1})


def _selection_memory(comp: _Components, device: torch.device, ks: Sequence[int], chunks: Sequence[int],
                      block: int) -> dict:
    ks, chunks = sorted(set(ks)), sorted(set(chunks))
    out: dict = {"noise_block": block, "batch": comp.tr.imgs.shape[0], "rows": [],
                 "method": ("torch.cuda.max_memory_allocated - memory_allocated before the call"
                            if device.type == "cuda" else
                            "torch.profiler profile_memory: peak live bytes of the CPU allocator during the call, "
                            "above the level at its start"),
                 "what": "one study.objectives.cimle call under torch.no_grad on a fixed decoder prefix"}
    if not ks or not chunks:
        return out
    _log(f"bench: selection memory, k {ks} x chunk {chunks}")
    grid: dict[tuple[int, int], int | None] = {}
    for k in ks:
        for c in chunks:
            memo, _ = measure_memory(comp.selection(k, c), device)
            grid[(k, c)] = memo["extra_bytes"]
            out["rows"].append({"k": k, "chunk": c, "effective_chunk": min(c, k), "peak_bytes": memo["extra_bytes"]})
    if any(v is None for v in grid.values()):
        return out
    kmin, kmax, cmin, cmax = ks[0], ks[-1], chunks[0], chunks[-1]
    # at a fixed chunk that every k can use (chunk <= min k), memory should not depend on k
    fixed = [c for c in chunks if c <= kmin] or [cmin]
    vs_k = {str(c): _ratio(grid[(kmax, c)], grid[(kmin, c)]) for c in fixed}
    vs_chunk = {str(k): _ratio(grid[(k, min(cmax, k))] if (k, min(cmax, k)) in grid else grid[(k, cmax)],
                               grid[(k, cmin)]) for k in ks}
    grows_k = max(v for v in vs_k.values() if v is not None)
    grows_c = min(v for v in vs_chunk.values() if v is not None)
    out["verdict"] = {
        f"k{kmax}_over_k{kmin}_at_chunk": vs_k,
        f"chunk_max_over_chunk{cmin}_at_k": vs_chunk,
        "grows_with_chunk_not_k": bool(grows_c > 1.5 and grows_k < 1.25),
        "rule": "grows with chunk: every k's peak at its largest chunk >= 1.5x its peak at the smallest; "
                "not with k: at a fixed chunk the largest k's peak < 1.25x the smallest k's",
    }
    return out


# --------------------------------------------------------------------------- printing / CLI


def format_table(res: dict) -> str:
    lines = []
    env, st = res["environment"], res["settings"]
    lines.append(f"device {env['device']} ({env['device_name']}), torch {env['torch']}, threads {env['threads']}, "
                 f"batch {st['batch']}, precision {st['precision']}, {st['steps']} rounds after {st['warmup']} warm-up")
    head = f"{'variant':<30} {'step ms':>9} {'img/s':>9} {'peak MiB':>9} {'vs LS':>7} {'model ms':>9} {'meas/model':>10}"
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        model = r.get("cost_model_s")
        model_txt = "" if model is None else f"{1e3 * model:9.2f}"
        ratio = r.get("vs_cost_model")
        ratio_txt = "" if ratio is None else f"{ratio:10.2f}"
        lines.append(
            f"{r['name']:<30} {1e3 * r['step_s']:9.2f} {r['images_per_s']:9.1f} {_fmt_bytes(r['peak_bytes']):>9} "
            f"{r['vs_ls']:7.2f} {model_txt:>9} {ratio_txt:>10}"
        )
    c = res["components"]
    lines.append(f"components (ms): E_fb {1e3 * c['E_fb_s']:.2f}, "
                 + ", ".join(f"D_fb@{b} {1e3 * v:.2f}" for b, v in c["D_fb_s"].items()) + ", "
                 + ", ".join(f"D_f@{b} {1e3 * v:.2f}" for b, v in c["D_f_s"].items())
                 + f", optimizer {1e3 * c['optimizer_s']:.2f}")
    s = c["selection"]
    if s is not None:
        lines.append(f"selection k={s['k']} (no grad, chunk {s['chunk']}): {1e3 * s['seconds']:.2f} ms = "
                     f"{s['vs_model']:.2f} x (k+1) D_f")
    lines.append(f"ours LS / transformers: {_num(res['ours_vs_transformers'])}    "
                 f"LS / (E_fb + D_fb): {_num(res['ls_vs_cost_model'])}    mvae / LS: {_num(res['mvae_vs_ls'])}")
    lines.append("cimle / cost model:            " + _kv(res["cimle_vs_cost_model"]))
    lines.append("cimle / (cost model + optim):  " + _kv(res["cimle_vs_cost_model_with_optimizer"]))
    lines.append("cimle / LS:                    " + _kv(res["cimle_vs_ls"]))
    for label, rr in (("paired per round", res["robust_ratios"]["paired_wall"]),
                      ("CPU time", res["robust_ratios"]["cpu_time"])):
        lines.append(f"  {label}: ours/transformers {_num(rr.get('ours_vs_transformers'))}, "
                     f"mvae/LS {_num(rr.get('mvae_vs_ls'))}")
        lines.append("    cimle / cost model: " + _kv(rr["cimle_vs_cost_model"]))
        lines.append("    cimle / LS:         " + _kv(rr["cimle_vs_ls"]))
    if res["late_noise"]:
        lines.append("late noise:")
        for r in res["late_noise"]:
            lines.append(f"  k={r['k']} noise at block {r['noise_block']} ({r['where']}, {r['suffix_blocks']} suffix "
                         f"blocks): step {1e3 * r['step_s']:.2f} ms, vs LS {r['vs_ls']:.2f}, "
                         f"vs cost model {r['vs_cost_model']:.2f} (paired vs LS {_num(r['vs_ls_paired'])}, "
                         f"CPU time vs LS {_num(r['vs_ls_cpu_time'])})")
    sel = res["selection_memory"]
    if sel["rows"]:
        ks = sorted({r["k"] for r in sel["rows"]})
        chunks = sorted({r["chunk"] for r in sel["rows"]})
        grid = {(r["k"], r["chunk"]): r["peak_bytes"] for r in sel["rows"]}
        lines.append(f"selection peak MiB (rows k, columns chunk; {sel['method'].split(':')[0]}):")
        lines.append("  k \\ chunk " + "".join(f"{c:>9}" for c in chunks))
        for k in ks:
            lines.append(f"  {k:>9} " + "".join(f"{_fmt_bytes(grid[(k, c)]):>9}" for c in chunks))
        if "verdict" in sel:
            lines.append(f"  grows with chunk, not k: {sel['verdict']['grows_with_chunk_not_k']}")
    p = res["parameters"]
    lines.append("parameters: ours LS {:,} (trainable {:,}), cIMLE {:,}, mvae {:,}".format(
        p["ours_ls"]["total"], p["ours_ls"]["trainable"], p["ours_cimle"]["total"], p["ours_mvae"]["total"]))
    if "transformers" in p:
        lines.append("            transformers {:,} (trainable {:,}); difference LS - transformers: {:,}".format(
            p["transformers"]["total"], p["transformers"]["trainable"], p["ls_minus_transformers"]))
    shown = [n for n in res["host_syncs"] if n in ("ls", "mvae") or n == next(
        (m for m in res["host_syncs"] if m.startswith("cimle")), None)]
    for name in shown:
        hits = res["host_syncs"][name]
        lines.append(f"host syncs in one {name} step: {sum(hits.values())}")
        for where, n in hits.items():
            lines.append(f"    {n} x {where}")
    lines.append("targets (reported, not asserted):")
    for k, v in res["targets"].items():
        lines.append(f"  {k}: " + ("; ".join(f"{kk}: {vv}" for kk, vv in v.items()) if isinstance(v, dict) else str(v)))
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _kv(d: dict) -> str:
    return "  ".join(f"k={k}: {_num(v)}" for k, v in d.items())


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _int_list0(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 0, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=_int_list, default=list(DEFAULT_KS), help="cIMLE k values (default 1,2,4,8,16)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: optim.batch_size)")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--out", default=None, help="JSON file to write (atomically)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' ViTMAEForPreTraining")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (falls back to eager on error)")
    p.add_argument("--selection-k", type=_int_list, default=list(DEFAULT_SELECTION_KS),
                   help="k values of the selection-memory grid (default 4,8,16)")
    p.add_argument("--selection-chunk", type=_int_list, default=list(DEFAULT_SELECTION_CHUNKS),
                   help="chunk values of the selection-memory grid (default 1,2,4,8)")
    p.add_argument("--late-k", type=int, default=8, help="k of the late-noise rows (default 8)")
    p.add_argument("--late-blocks", type=_int_list0, default=None,
                   help="noise blocks of the late-noise rows (default: 0 and decoder_depth - 1)")
    p.add_argument("--no-late-noise", action="store_true", help="skip the late-noise rows")
    p.add_argument("--selection-block", type=int, default=None,
                   help="noise block of the selection-memory grid (default: the config's noise.block)")
    p.add_argument("--no-selection-timing", action="store_true",
                   help="do not time the selection alone at the largest k (saves (k+1) D_f per round)")


def run_from_args(args: argparse.Namespace) -> int:
    import json

    from study.config import load_config

    cfg = load_config(args.config, args.overrides)
    try:
        res = run_bench(cfg, ks=args.k, batch=args.batch, steps=args.steps, warmup=args.warmup,
                        transformers=not args.no_transformers, compile_models=args.compile,
                        selection_ks=args.selection_k, selection_chunks=args.selection_chunk,
                        late_noise=not args.no_late_noise, late_k=args.late_k, late_blocks=args.late_blocks,
                        selection_block=args.selection_block, selection_timing=not args.no_selection_timing,
                        config_path=args.config)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(res))
    if args.out:
        atomic_write_text(args.out, json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
