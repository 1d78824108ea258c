"""Hardware efficiency, as nanoGPT prints MFU: the FLOPs of a step, the device's matmul peak, the achieved share.

* **Step FLOPs** are counted, not modelled: one step of a variant runs under
  ``torch.utils.flop_counter.FlopCounterMode``, which adds up the matmuls,
  convolutions and attention of the forward *and* backward pass (2 FLOPs per
  multiply-add). So cIMLE's k no-gradient decodes are in its count, and the
  count is the same at every precision. PyTorch's CPU attention kernel
  (``_scaled_dot_product_flash_attention_for_cpu``) is missing from the
  counter's table; it is counted with the formula of the other attention
  kernels. Elementwise work (norms, GELU, softmax, AdamW) counts 0, as in MFU.
* **Peak** is measured in the same run: the best of a few large matmuls at the
  run's dtype (bf16 operands for bf16, fp16 for fp16), the number this
  machine's matrix units actually reach, not a data-sheet figure.
* **Achieved share** = step FLOPs / step seconds / peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from experiments.bench.timing import sync

__all__ = ["step_flops", "matmul_peak", "PEAK_SHAPES"]

# (M, K, N): two squares and the in100 decoder's MLP at batch 32 (32 x 197 tokens, 512 -> 2048)
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (6304, 512, 2048))
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_attention_formulas() -> dict:
    """Formulas (on shapes, as the counter's own) for the CPU attention kernel and its backward."""
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _attention_backward_flops
    return out


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward, backward and optimizer step; only matmul-like ops count)."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        step()
    return int(counter.get_total_flops())


def matmul_peak(precision: str, device: torch.device, shapes=PEAK_SHAPES, min_seconds: float = 0.5) -> dict:
    """The best matmul throughput (FLOP/s) at ``precision`` on ``device`` over ``shapes``, each timed for
    at least ``min_seconds`` after one warm-up call."""
    dtype = _DTYPES[precision]
    gen = torch.Generator().manual_seed(0)
    per_shape = []
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        calls, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            calls += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        per_shape.append({"m": m, "k": k, "n": n, "flop_per_s": 2 * m * k * n * calls / elapsed, "calls": calls})
    best = max(per_shape, key=lambda r: r["flop_per_s"])
    return {"precision": precision, "dtype": str(dtype), "flop_per_s": best["flop_per_s"],
            "best_shape": [best["m"], best["k"], best["n"]], "shapes": per_shape,
            "threads": torch.get_num_threads()}
