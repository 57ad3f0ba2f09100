"""The factored gated delta rule (whole frames as batched GEMMs) against the plain fp32 reference, on the CPU.

Tolerance as for the Triton kernel's fp32 tests: 1e-5 of the reference's max abs (the factored form sums
``(K^T K) M`` where the reference sums ``K^T (K M)``). Its gradients, which training uses, are checked against
the reference's too.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.gdn_cases import FP32_TOL, SHAPES, _check, _inputs, _rel, _state
from tests.ops.test_gated_delta import _bad_cases
from world_model.ops import gated_delta
from world_model.ops.gated_delta import factored, naive


@pytest.mark.parametrize("frames, tokens, dk, dv", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_reference(frames, tokens, dk, dv, with_state):
    x = _inputs(frames, frames=frames, tokens=tokens, dk=dk, dv=dv)
    state = _state(1, 1, 2, dk, dv) if with_state else None
    _check(factored.frame_gated_delta_rule(*x, initial_state=state),
           naive.frame_gated_delta_rule(*x, initial_state=state), FP32_TOL)


@pytest.mark.parametrize("frames, tokens, dk, dv", SHAPES)
def test_reverse_matches_reference(frames, tokens, dk, dv):
    x = _inputs(frames + 10, frames=frames, tokens=tokens, dk=dk, dv=dv)
    out, final = factored.frame_gated_delta_rule(*x, reverse=True)
    _check((out, final), naive.frame_gated_delta_rule(*x, reverse=True), FP32_TOL)
    assert torch.count_nonzero(out[:, :, -1]) == 0  # the last frame has nothing after it


@pytest.mark.parametrize("frames, tokens, dk, dv", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_bidirectional_matches_reference(frames, tokens, dk, dv, with_state):
    x = _inputs(frames + 20, frames=frames, tokens=tokens, dk=dk, dv=dv)
    state = _state(2, 1, 2, dk, dv) if with_state else None
    _check(factored.frame_gated_delta_bidirectional(*x, initial_state=state),
           naive.frame_gated_delta_bidirectional(*x, initial_state=state), FP32_TOL)


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


def test_strided_inputs():
    """Views as the model passes them: heads split by a transpose, a chunk sliced out of the frames."""
    q, k, v, beta, gamma = _inputs(50, batch=2, heads=2, frames=5, tokens=24, dk=32, dv=32)
    q, k, v = (t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)[:, :, 1:4] for t in (q, k, v))
    beta = beta.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[:, :, 1:4]
    gamma = gamma[:, :, 1:4]
    state = _state(5, 2, 2, 32, 32).transpose(-1, -2).contiguous().transpose(-1, -2)
    x = (q, k, v, beta, gamma)
    _check(factored.frame_gated_delta_bidirectional(*x, initial_state=state),
           naive.frame_gated_delta_bidirectional(*x, initial_state=state), FP32_TOL)


def test_streaming_equals_one_shot():
    x = _inputs(70, frames=4)
    one_out, one_final = factored.frame_gated_delta_rule(*x)
    out_a, state = factored.frame_gated_delta_rule(*(t[:, :, :1] for t in x))
    out_b, final = factored.frame_gated_delta_rule(*(t[:, :, 1:] for t in x), initial_state=state)
    assert _rel(torch.cat([out_a, out_b], dim=2), one_out) < FP32_TOL
    assert _rel(final, one_final) < FP32_TOL


def test_batch_elements_are_independent():
    x = _inputs(71, batch=3)
    out, final = factored.frame_gated_delta_bidirectional(*x)
    for b in range(3):
        alone, alone_final = factored.frame_gated_delta_bidirectional(*(t[b : b + 1] for t in x))
        assert _rel(out[b : b + 1], alone) < FP32_TOL and _rel(final[b : b + 1], alone_final) < FP32_TOL


def test_initial_state_is_not_modified_and_zero_frames_pass_it_through():
    state = _state(7, 1, 2, 48, 48)
    copy = state.clone()
    factored.frame_gated_delta_bidirectional(*_inputs(72), initial_state=state)
    assert torch.equal(state, copy)
    out, final = factored.frame_gated_delta_rule(*_inputs(73, frames=0), initial_state=state)
    assert out.shape == (1, 2, 0, 40, 48) and torch.equal(final, state) and final is not state
    out, final = factored.frame_gated_delta_bidirectional(*_inputs(74, frames=0))
    assert out.shape == (1, 2, 0, 40, 48) and torch.count_nonzero(final) == 0


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


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_shapes_raise_as_the_reference_does(case):
    message, args, kwargs = _bad_cases()[case]
    with pytest.raises(ValueError, match=message):
        factored.frame_gated_delta_rule(*args, **kwargs)
