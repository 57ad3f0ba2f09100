"""Inputs and checks shared by the tests of the gated delta rule's implementations against the reference."""

from __future__ import annotations

import torch

from tests.conftest import rel_err

FP32_TOL = 1e-5  # max abs error over the reference's max abs: fp32 round-off, the sums run in another order


def _inputs(seed=0, *, batch=1, heads=2, frames=3, tokens=40, dk=48, dv=48, dtype=torch.float32, with_state=False):
    """q, k, v, beta, gamma like the model's: ReLU keys scaled by 1/sqrt(Dk S), beta in [0, 1], gamma in (0, 1].

    Both ends of the gates are hit exactly: some beta are 0 or 1, some gamma are 1. ``with_state`` also returns a
    random fp32 initial state ``(B, H, Dk, Dv)`` drawn after them: ``(inputs, state)``.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, frames, tokens)
    q = torch.randn(*shape, dk, generator=g)
    k = torch.relu(torch.randn(*shape, dk, generator=g)) * (dk * tokens) ** -0.5
    v = torch.randn(*shape, dv, generator=g)
    beta = torch.rand(*shape, generator=g)
    beta.view(-1)[::7] = 0.0
    beta.view(-1)[3::7] = 1.0
    gamma = 1.0 - 0.9 * torch.rand(batch, heads, frames, generator=g)  # (0.1, 1]
    gamma.view(-1)[::3] = 1.0
    inputs = [x.to(dtype) for x in (q, k, v, beta, gamma)]
    return (inputs, torch.randn(batch, heads, dk, dv, generator=g)) if with_state else inputs


def _state(seed, batch, heads, dk, dv):
    return torch.randn(batch, heads, dk, dv, generator=torch.Generator().manual_seed(seed))


def _rel(actual, expected):
    """``rel_err``, and the max abs error itself where the reference is all zeros (a reverse scan of one frame)."""
    return rel_err(actual, expected) if expected.abs().max() > 0 else float(actual.abs().max())


def _check(actual, expected, tol):
    out, final = actual
    ref_out, ref_final = expected
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    assert out.shape == ref_out.shape and final.shape == ref_final.shape
    assert _rel(out, ref_out) < tol, _rel(out, ref_out)
    assert _rel(final, ref_final) < tol, _rel(final, ref_final)


SHAPES = [  # (frames, tokens, dk, dv)
    (1, 40, 48, 48),  # tiny model's heads; Dk padded 48 -> 64
    (2, 40, 48, 1),  # the normaliser: a Dk x 1 state (Dv padded to 16)
    (3, 40, 112, 112),  # full model's head dim, padded to 128
    (4, 21, 16, 20),  # one token tile, partly masked; Dv split over two column blocks
    (3, 300, 128, 1),  # demo model's Dk; two token tiles of the interpreter's 256, the second partial
]
