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

from study.methods import register
from study.methods.base import Context, Objective, PretrainOutput
from study.losses import cimle


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
    def decoder_noise(self):
        return self.cfg.noise

    def loss(self, model, ctx: Context) -> PretrainOutput:
        c = self.cfg.cimle
        # the loss reads the masked patches only: they are all that is decoded, in the noise rows' order
        rows = ctx.ids.masked[..., None].expand(-1, -1, ctx.target.shape[-1])  # [B, N_mask, p*p*C]
        decode = model.decoder.masked_sampler(ctx.hidden, ctx.mask, ctx.ids.masked)  # z -> [B, N_mask, p*p*C]
        res = cimle(decode, ctx.target.gather(1, rows), k=c.k if ctx.k is None else ctx.k,
                    noise_shape=model.noise_shape(ctx.ids.num_masked), chunk=c.chunk, generator=ctx.generator,
                    vectorize=model.vectorize, select=c.select)
        return _selection_stats(res)
