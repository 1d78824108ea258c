"""Checks of the third-party internals this package relies on, with a message that says what to install."""

from __future__ import annotations

from study.utils.errors import UserError

__all__ = ["TIMM_TESTED", "UnsupportedDependency", "check_timm_attention", "timm_attention"]

# The timm releases the test suite passed with; pyproject.toml pins the same range.
TIMM_TESTED = ">=1.0.29,<=1.0.31"
# timm Attention attributes that study.models.attention.Attention reads
ATTENTION_ATTRIBUTES = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "attn_dim",
                        "norm", "proj", "proj_drop", "gate")


class UnsupportedDependency(UserError, ImportError):
    """An installed package lacks what this package needs; the message says what to install."""


def _unsupported_timm(what: str) -> UnsupportedDependency:
    import timm

    return UnsupportedDependency(
        f"timm {timm.__version__} is not supported: {what}, which study/models/attention.py needs; install a tested "
        f"timm: pip install 'timm{TIMM_TESTED}' (make setup installs the tested versions from constraints.txt)")


def timm_attention() -> type:
    """timm's ``Attention`` class (exported by ``timm.layers`` since timm 1.0.1x)."""
    try:
        from timm.layers import Attention
    except ImportError:
        raise _unsupported_timm("timm.layers has no Attention") from None
    return Attention


def check_timm_attention(attention) -> None:
    """Raise :class:`UnsupportedDependency` if ``attention`` lacks an attribute that the decoder reads."""
    missing = [name for name in ATTENTION_ATTRIBUTES if not hasattr(attention, name)]
    if missing:
        raise _unsupported_timm(f"its Attention lacks {', '.join(missing)}")
