"""The forms of RoPE and UCPE taken under torch.compile (real arithmetic, broadcast sums) equal the eager ones,
and the K short conv's shifted sums equal its definition as a causal plus an anti-causal depthwise conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from world_model.modules import TemporalShortConv, apply_rope, apply_ucpe


def _compiled_forms(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_in_real_arithmetic_equals_the_complex_product(monkeypatch, inverse):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 16, generator=g, dtype=torch.float64).float()
    rope = torch.polar(torch.ones(10, 8), torch.rand(10, 8, generator=g) * 6.3)
    eager = apply_rope(x, rope, inverse=inverse)
    _compiled_forms(monkeypatch)
    torch.testing.assert_close(apply_rope(x, rope, inverse=inverse), eager, rtol=1e-6, atol=1e-6)


def test_ucpe_as_broadcast_sum_equals_the_einsum(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, mats = torch.randn(2, 3, 10, 32, generator=g), torch.randn(2, 10, 4, 4, generator=g)
    rope = torch.polar(torch.ones(10, 8), torch.rand(10, 8, generator=g))
    eager = apply_ucpe(x, mats, rope)
    _compiled_forms(monkeypatch)
    torch.testing.assert_close(apply_ucpe(x, mats, rope), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 3, 4, 6])
@pytest.mark.parametrize("with_left", [False, True])
def test_short_conv_is_causal_plus_anticausal_depthwise_conv(frames, with_left):
    g = torch.Generator().manual_seed(frames)
    conv = TemporalShortConv(5, 4)
    conv.weight.data = torch.randn(5, 1, 4, generator=g)
    x = torch.randn(2, frames, 7, 5, generator=g)
    left = torch.randn(2, 3, 7, 5, generator=g) if with_left else None
    # the definition: y[t] = sum_j w_j x[t-3+j] (left context or zeros) + sum_j w_j x[t+3-j] (zeros past the chunk) - w_3 x[t]
    seq = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 5, t.shape[1])
    context = seq(left) if with_left else torch.zeros(14, 5, 3)
    causal = F.conv1d(torch.cat([context, seq(x)], dim=-1), conv.weight, groups=5)
    anti = F.conv1d(seq(x).flip(-1), conv.weight, groups=5, padding=3)[..., :frames].flip(-1)
    expected = (causal + anti - seq(x) * conv.weight[:, 0, -1, None]).reshape(2, 7, 5, frames).permute(0, 3, 1, 2)
    torch.testing.assert_close(conv(x, left), expected, rtol=1e-5, atol=1e-5)
