"""Conditional IMLE: k noise samples decoded from one encoding, the nearest kept, least squares on it.

The encoder and the decoder's blocks before the noise run once (the model's :class:`Context`);
:func:`study.objectives.cimle` decodes the k samples through ``decoder.suffix`` without gradient and
once more with gradient for the chosen one. ``cimle.select``:

* ``"image"``: the nearest of k samples per image (noise ``[B, dim]`` or ``[B, N_mask, dim]``).
* ``"token"``: factorised, each masked patch keeps its nearest of k. The objective sees only the
  masked patches ``[B, N_mask, ...]``, whose rows line up with the token noise ``z [B, N_mask, dim]``;
  the config guarantees that a patch's output depends on its own noise row only (exact selection).
"""

from __future__ import annotations

from study.methods import register
from study.methods.base import Context, Objective, PretrainOutput
from study.objectives import cimle


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
        target, mask, rows = ctx.target, ctx.mask, None
        if c.select == "token":  # the objective sees the masked patches only, in the noise rows' order
            rows = ctx.ids.masked[..., None].expand(-1, -1, ctx.target.shape[-1])  # [B, N_mask, p*p*C]
            target, mask = ctx.target.gather(1, rows), None

        def decode(z):
            pred = model.decoder.suffix(ctx.hidden, z, ctx.mask)  # [B, N, p*p*C]
            return pred if rows is None else pred.gather(1, rows)

        res = cimle(decode, target, k=c.k if ctx.k is None else ctx.k, noise_shape=model.noise_shape(ctx.ids.num_masked), mask=mask,
                    chunk=c.chunk, generator=ctx.generator, vectorize=model.vectorize, select=c.select)
        return _selection_stats(res)
