"""Least squares (MAE): the decoder runs once without noise; the loss is the masked patches' MSE.

With the noise in a token-wise head (``noise.block = "head"``), the decoder still has the head and
feeds it ``z = 0``: least squares gets the same model as cIMLE.
"""

from __future__ import annotations

from study.methods import register
from study.methods.base import Context, Objective, PretrainOutput
from study.losses import least_squares


@register("ls")
class LeastSquares(Objective):
    def loss(self, model, ctx: Context) -> PretrainOutput:
        pred = model.decoder.suffix(ctx.hidden, None, ctx.mask)  # [B, N, p*p*C]
        loss = least_squares(pred, ctx.target, ctx.mask)
        return PretrainOutput(loss, {"recon": loss.detach()})
