"""What every fast implementation of the frame-wise gated delta rule must do, against the plain fp32 reference.

Each test runs for the factored (batched-GEMM) form and for the Triton kernel (in Triton's interpreter on the CPU;
skipped without Triton). Their own properties are in test_gated_delta_factored.py and test_gated_delta_triton.py.
Tolerance: 1e-5 of the reference's max abs (``FP32_TOL``: fp32 round-off, the sums run in another order).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.ops.gdn_cases import FP32_TOL, SHAPES, _check, _inputs, _rel, _state
from tests.ops.test_gated_delta import _bad_cases
from world_model.ops.gated_delta import factored, naive, triton_kernel

IMPLEMENTATIONS = [
    pytest.param(factored, id="factored"),
    pytest.param(triton_kernel, id="triton",
                 marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")),
]
pytestmark = pytest.mark.parametrize("impl", IMPLEMENTATIONS)


@pytest.mark.parametrize("frames, tokens, dk, dv", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_reference(impl, frames, tokens, dk, dv, with_state):
    x = _inputs(frames, frames=frames, tokens=tokens, dk=dk, dv=dv)
    state = _state(1, 1, 2, dk, dv) if with_state else None
    _check(impl.frame_gated_delta_rule(*x, initial_state=state), naive.frame_gated_delta_rule(*x, initial_state=state), FP32_TOL)


@pytest.mark.parametrize("frames, tokens, dk, dv", SHAPES)
def test_reverse_matches_reference(impl, frames, tokens, dk, dv):
    x = _inputs(frames + 10, frames=frames, tokens=tokens, dk=dk, dv=dv)
    out, final = impl.frame_gated_delta_rule(*x, reverse=True)
    _check((out, final), naive.frame_gated_delta_rule(*x, reverse=True), FP32_TOL)
    assert torch.count_nonzero(out[:, :, -1]) == 0  # the last frame has nothing after it


@pytest.mark.parametrize("frames, tokens, dk, dv", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_bidirectional_matches_reference(impl, frames, tokens, dk, dv, with_state):
    x = _inputs(frames + 20, frames=frames, tokens=tokens, dk=dk, dv=dv)
    state = _state(2, 1, 2, dk, dv) if with_state else None
    _check(impl.frame_gated_delta_bidirectional(*x, initial_state=state),
           naive.frame_gated_delta_bidirectional(*x, initial_state=state), FP32_TOL)


def test_strided_inputs(impl):
    """Views as the model passes them: heads split by a transpose, a chunk sliced out of the frames."""
    batch, heads, frames, tokens, dk, dv = 2, 2, 5, 24, 32, 32
    q, k, v, beta, gamma = _inputs(50, batch=batch, heads=heads, frames=frames, tokens=tokens, dk=dk, dv=dv)
    # (B, T, S, H, D) storage, seen as (B, H, T, S, D), then frames 1..3.
    q, k, v = (t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)[:, :, 1:4] for t in (q, k, v))
    beta = beta.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[:, :, 1:4]
    gamma = gamma.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 1:4]
    state = _state(5, batch, heads, dk, dv).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q.is_contiguous() and not state.is_contiguous()
    x = (q, k, v, beta, gamma)
    _check(impl.frame_gated_delta_bidirectional(*x, initial_state=state),
           naive.frame_gated_delta_bidirectional(*x, initial_state=state), FP32_TOL)


def test_streaming_equals_one_shot(impl):
    x = _inputs(70, frames=4)
    one_out, one_final = impl.frame_gated_delta_rule(*x)
    out_a, state = impl.frame_gated_delta_rule(*(t[:, :, :1] for t in x))
    out_b, final = impl.frame_gated_delta_rule(*(t[:, :, 1:] for t in x), initial_state=state)
    assert _rel(torch.cat([out_a, out_b], dim=2), one_out) < FP32_TOL
    assert _rel(final, one_final) < FP32_TOL


def test_initial_state_is_not_modified(impl):
    x = _inputs(72)
    state = _state(7, 1, 2, 48, 48)
    copy = state.clone()
    impl.frame_gated_delta_bidirectional(*x, initial_state=state)
    assert torch.equal(state, copy)


def test_zero_frames_pass_the_state_through(impl):
    x = _inputs(73, frames=0)
    state = _state(8, 1, 2, 48, 48)
    out, final = impl.frame_gated_delta_rule(*x, initial_state=state)
    assert out.shape == (1, 2, 0, 40, 48) and torch.equal(final, state) and final is not state


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_shapes_raise_as_the_reference_does(impl, case):
    message, args, kwargs = _bad_cases()[case]
    with pytest.raises(ValueError, match=message):
        impl.frame_gated_delta_rule(*args, **kwargs)
