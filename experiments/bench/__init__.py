"""Training-step benchmark: LS, cIMLE at several k and the Masked VAE, against transformers' ViTMAE.

    python -m experiments.bench --config experiments/configs/cpu-small.yaml --out results/bench/cpu-small.json
    python -m experiments.bench --config experiments/configs/in100-vit-t.yaml --set device=cpu --set precision=fp32 \\
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
  ``D_fb`` decoder ``prefix`` + the objective's decode (``decoder.masked_sampler``)
  forward + backward (with the noise input and the loss, gradient flowing back
  to the encoder's output); ``D_f`` one no-gradient pass of the decode's
  per-sample part (blocks ``j ..`` where the noise enters, norm, prediction at
  the masked patches; with the noise in the head, the head after the part of
  its first layer that reads the decoder features) at batch B plus its
  distance to the target. The blocks before ``j``, and what the sampler shares
  across samples, run once per step, with gradient, and are part of ``D_fb``;
  only the per-sample part is repeated, so ``D_f`` is that part alone. The
  model leaves out the optimizer step, the mask and the target;
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
  0, at ``decoder_depth - 1`` (the last block) and in the token-wise head after
  the last attention (``head``; ``--late-blocks`` picks others,
  ``decoder_depth`` = after the last block), each step against LS.
* **Hardware efficiency** (:mod:`~experiments.bench.flops`, as nanoGPT prints MFU):
  the FLOPs of one step of every variant, counted by PyTorch's flop counter
  (forward and backward matmuls and attention), the matmul peak of the device
  at each precision measured in the same run, and each step's share of it.

The steps' host syncs (each a device sync on CUDA) are counted by a test,
``tests/test_gpu_readiness.py``, not here: they are a property of the code, not a timing.

The modules, one job each: :mod:`~experiments.bench.settings` (checked settings),
:mod:`~experiments.bench.variants` (our trainers, the timed variants, the cost-model
components), :mod:`~experiments.bench.transformers_side` (transformers' model, its
trainer, parameter counts), :mod:`~experiments.bench.timing` (round-robin timing),
:mod:`~experiments.bench.memory` (peak memory, the selection-memory grid),
:mod:`~experiments.bench.flops`
(FLOPs and the matmul peak), :mod:`~experiments.bench.run` (the stages in order),
:mod:`~experiments.bench.ratios` and :mod:`~experiments.bench.report` (one precision's
JSON report), :mod:`~experiments.bench.precisions` (the reports of every precision
and the speed-ups across them), :mod:`~experiments.bench.table` (the printed table)
and :mod:`~experiments.bench.cli` (the command's arguments).
"""

from experiments.bench.run import run_bench

__all__ = ["run_bench"]
