"""The factored gated delta rule (whole frames as batched GEMMs): what only it does. Its agreement with the reference
is in test_gated_delta_implementations.py (1e-5 of the reference's max abs: it sums ``(K^T K) M`` where the
reference sums ``K^T (K M)``). Here: its gradients, which training can use, against the reference's.
"""

from __future__ import annotations

import torch

from tests.ops.gdn_cases import FP32_TOL, _check, _inputs, _rel, _state
from world_model.ops import gated_delta
from world_model.ops.gated_delta import factored, naive


def test_gradients_match_the_reference():
    """Training runs the rule under autograd: every input's gradient, through the output and the final state."""
    x = _inputs(30, batch=2, frames=3, tokens=24, dk=16, dv=8)
    state = _state(3, 2, 2, 16, 8)
    grads = []
    for impl in (naive, factored):
        leaves = [t.clone().requires_grad_(True) for t in (*x, state)]
        out, final = impl.frame_gated_delta_bidirectional(*leaves[:5], initial_state=leaves[5])
        weights = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)  # a loss that sees every output differently
        ((out * weights).sum() + final.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for reference, actual in zip(*grads):
        assert actual is not None and _rel(actual, reference) < 1e-4, _rel(actual, reference)


def test_batch_elements_are_independent():
    x = _inputs(71, batch=3)
    out, final = factored.frame_gated_delta_bidirectional(*x)
    for b in range(3):
        alone, alone_final = factored.frame_gated_delta_bidirectional(*(t[b : b + 1] for t in x))
        assert _rel(out[b : b + 1], alone) < FP32_TOL and _rel(final[b : b + 1], alone_final) < FP32_TOL


def test_bf16_inputs_compute_in_fp32():
    x = _inputs(40, batch=2, frames=3, tokens=40, dk=48, dv=48, dtype=torch.bfloat16)
    state = _state(4, 2, 2, 48, 48)
    _check(factored.frame_gated_delta_bidirectional(*x, initial_state=state),
           naive.frame_gated_delta_bidirectional(*[t.float() for t in x], initial_state=state), FP32_TOL)


def test_the_backend_setting_picks_it(monkeypatch):
    x = _inputs(80)
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "factored")
    picked = gated_delta.frame_gated_delta_bidirectional(*x)
    assert all(torch.equal(a, b) for a, b in zip(picked, factored.frame_gated_delta_bidirectional(*x)))
    picked = gated_delta.frame_gated_delta_rule(*x, reverse=True)
    assert all(torch.equal(a, b) for a, b in zip(picked, factored.frame_gated_delta_rule(*x, reverse=True)))
