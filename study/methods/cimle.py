"""Conditional IMLE: k noise samples decoded from one encoding, the nearest kept, least squares on it.

The encoder and the decoder's blocks before the noise run once (the model's :class:`Context`);
``decoder.masked_sampler`` does what else does not depend on the noise once (with the noise in the
head: the norm and the head's first layer on the decoder features) and returns the per-sample rest,
which predicts the masked patches only, the only ones the loss reads. :func:`study.losses.cimle`
runs it k times without gradient and once more with gradient for the chosen noise. ``cimle.select``:

* ``"image"``: the nearest of k samples per image (noise ``[B, dim]`` or ``[B, N_mask, dim]``).
* ``"token"``: factorised, each masked patch keeps its nearest of k; the masked patches' rows
  ``[B, N_mask, ...]`` line up with the token noise ``z [B, N_mask, dim]``, and the config guarantees
  that a patch's output depends on its own noise row only (exact selection).
"""

from __future__ import annotations

import torch

from study.losses import cimle, cimle_noise
from study.methods import register
from study.methods.base import Context, Objective, PretrainOutput
from study.utils.device import samples_that_fit


def _selection_stats(res) -> PretrainOutput:
    """cIMLE's loss and its selection statistics; ``distances`` is ``[B, k]`` (per image) or
    ``[B, k, N_mask]`` (per token), ``index`` ``[B]`` or ``[B, N_mask]``: k is dim 1 either way."""
    d = res.distances
    return PretrainOutput(res.loss, {
        "recon": res.loss.detach(),
        "dist_chosen": d.gather(1, res.index[:, None]).mean(),
        "dist_mean": d.mean(),
        "dist_gap": (d.max(dim=1).values - d.min(dim=1).values).mean(),
    }, selection=res)


@register("cimle")
class CIMLE(Objective):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._chunks: dict[tuple, int] = {}  # cimle.chunk "auto" per (batch, masked, k, device)

    def decoder_noise(self):
        return self.cfg.noise

    def draw(self, model, batch, num_masked, k, generator, device):
        c = self.cfg.cimle
        k = c.k if k is None else int(k)
        chunk = c.chunk
        if chunk == "auto":
            chunk = self._fitting_chunk(model, batch, num_masked, k, device)
        like = torch.empty((), device=device)  # float32: the targets' dtype, whatever autocast does
        return {"noise": cimle_noise(k, batch, model.noise_shape(num_masked), generator, like), "chunk": chunk}

    def _fitting_chunk(self, model, batch: int, num_masked: int, k: int, device) -> int:
        """``cimle.chunk: auto``, read before the step (the free memory is a host query a graph cannot hold) and
        once per shape: a chunk that changed from step to step would recompile a compiled step."""
        key = (batch, num_masked, k, str(device))
        if key not in self._chunks:
            self._chunks[key] = samples_that_fit(k, model.decoder.sample_bytes(batch, num_masked), device)
        return self._chunks[key]

    def loss(self, model, ctx: Context) -> PretrainOutput:
        c = self.cfg.cimle
        draws = ctx.draws or self.draw(model, ctx.target.shape[0], ctx.ids.num_masked, ctx.k, ctx.generator,
                                       ctx.target.device)
        # the loss reads the masked patches only: they are all that is decoded, in the noise rows' order
        rows = ctx.ids.masked[..., None].expand(-1, -1, ctx.target.shape[-1])  # [B, N_mask, p*p*C]
        decode = model.decoder.masked_sampler(ctx.hidden, ctx.mask, ctx.ids.masked)  # z -> [B, N_mask, p*p*C]
        folded = None
        if model.vectorize and _folds(c.decode, ctx.hidden):
            folded = model.decoder.folded_sampler(ctx.hidden, ctx.mask, ctx.ids.masked)  # [c, B, ...] at once
        noise = draws["noise"]
        res = cimle(decode, ctx.target.gather(1, rows), k=noise.shape[0], noise_shape=noise.shape[2:],
                    chunk=draws["chunk"], noise=noise, vectorize=model.vectorize, select=c.select,
                    decode_samples=folded)
        return _selection_stats(res)


def _folds(decode: str, hidden) -> bool:
    """Whether the samples are folded into the batch. ``auto``: on CUDA (and any device but the CPU), since
    under vmap attention takes the explicit path (``[k*B, heads, N, N]`` scores, an fp32 softmax) and
    vmapped linear layers leave autocast; and in a compiled step, where the batched modules trace without
    a graph break. On CPU eager vmap stays: the CPU studies' selections were made with it."""
    if decode != "auto":
        return decode == "batched"
    return hidden.device.type != "cpu" or torch.compiler.is_compiling()
