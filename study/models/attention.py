"""Self-attention of every transformer block here (encoder, decoder, Masked VAE): timm's, plus an explicit path.

``Attention`` is timm's ``Attention`` (same parameters and names) whose
forward computes softmax(q k^T / sqrt(d)) v with plain matmuls, instead of
``F.scaled_dot_product_attention``, in two cases:

* inside ``torch.func`` transforms (cIMLE's vmapped samples): on CPU (torch
  2.14) SDPA has no vmap batching rule and falls back to a slow per-sample loop;
* bf16 on CPU: the CPU flash-attention kernel's bf16 *backward* is slower than
  its fp32 one (measured at the in100 decoder's shape), while the explicit
  matmuls run on the CPU's bf16 matrix units (AMX).

Everywhere else (fp32, CUDA) it is timm's forward unchanged, so fp32 results
do not depend on this class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from study.utils.compat import check_timm_attention, timm_attention

__all__ = ["Attention", "explicit_attention_wanted"]

TimmAttention = timm_attention()  # a clear error if the installed timm is too old

try:  # functorch's marker for tensors seen inside torch.func transforms (vmap, grad)
    from torch._C._functorch import is_functorch_wrapped_tensor as _in_transform
except ImportError:  # pragma: no cover - older/newer torch without the hook
    def _in_transform(x: Tensor) -> bool:
        return False


def explicit_attention_wanted(x: Tensor) -> bool:
    """Whether the explicit matmul path should run for input ``x`` (see the module docstring)."""
    # a compiled graph cannot call the functorch check; the compiled step decodes its samples batched, not vmapped
    if not torch.compiler.is_compiling() and _in_transform(x):
        return True
    if x.device.type != "cpu":
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast_bf16 or x.dtype == torch.bfloat16


class Attention(TimmAttention):
    """timm ``Attention`` with the explicit path of the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_timm_attention(self)  # the forward below reads timm internals: fail at build, clearly

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal or self.gate is not None or not explicit_attention_wanted(x):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd] each
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)  # [B, N, H*hd]
        x = self.norm(x)
        return self.proj_drop(self.proj(x))  # [B, N, D]

    def forward_queries(self, x: Tensor, rows: Tensor) -> Tensor:
        """The output at some tokens only: ``x [B, N, D]``, ``rows [B, M]`` token indices -> ``[B, M, D]``,
        with queries at ``rows`` and keys and values at every token; ``forward(x)`` at ``rows``, up to
        rounding. The query projection, the attention rows and ``proj`` then cost M of N tokens."""
        if self.gate is not None:
            raise NotImplementedError("forward_queries does not implement timm's gated attention")
        B, N, C = x.shape
        M, H, hd = rows.shape[1], self.num_heads, self.head_dim
        w_q, w_kv = self.qkv.weight.split([self.attn_dim, 2 * self.attn_dim])  # qkv rows: q, k, v (timm's order)
        b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([self.attn_dim, 2 * self.attn_dim])
        q = F.linear(x.gather(1, rows[..., None].expand(-1, -1, C)), w_q, b_q)  # [B, M, H*hd]
        q = self.q_norm(q.reshape(B, M, H, hd).transpose(1, 2))  # [B, H, M, hd]
        k, v = F.linear(x, w_kv, b_kv).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
        k = self.k_norm(k)
        if explicit_attention_wanted(x):
            attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))  # [B, H, M, N]
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.norm(out.transpose(1, 2).reshape(B, M, self.attn_dim))  # [B, M, H*hd]
        return self.proj_drop(self.proj(out))  # [B, M, D]
