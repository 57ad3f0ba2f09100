"""Softmax attention as the reference implementations compute it.

Every NVlabs softmax path (and diffusers' port of it) casts Q/K/V to bf16 before SDPA, even in an fp32
run, and several zero-pad the 112-wide heads to 128 for FlashAttention without passing a scale, so SDPA
then uses 1/sqrt(128) (sana-wm.md B.4, L.2). ``reference_sdpa`` reproduces both choices explicitly so
that the path-specific temperature is a visible argument, not an accident of padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLASH_HEAD_DIMS = (32, 64, 128, 256)


def padded_head_dim(head_dim: int) -> int:
    """The head width the reference pads to before SDPA (its softmax temperature is 1/sqrt of this)."""
    if head_dim in FLASH_HEAD_DIMS or head_dim >= 256:
        return head_dim
    return 128 if head_dim <= 128 else 256


def reference_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pad_heads: bool,
    attn_mask: torch.Tensor | None = None,
    low_precision: bool = True,
) -> torch.Tensor:
    """SDPA over ``(B, H, N, D)`` tensors, returning the input dtype.

    ``pad_heads`` zero-pads D to the FlashAttention width (temperature 1/sqrt(padded D));
    ``low_precision`` casts fp32 inputs to bf16 first, as the reference code does.
    """
    dtype = q.dtype
    if low_precision and dtype == torch.float32:
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    else:
        k, v = k.to(dtype), v.to(dtype)
    head_dim = q.shape[-1]
    width = padded_head_dim(head_dim) if pad_heads else head_dim
    if width != head_dim:
        q, k, v = (F.pad(t, (0, width - head_dim)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out[..., :head_dim].to(dtype)
