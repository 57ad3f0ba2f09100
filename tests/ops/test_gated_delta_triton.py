"""The Triton kernel of the frame-wise gated delta rule against the plain fp32 reference, on the CPU.

CPU tensors run the kernel in Triton's interpreter (``triton_kernel`` loads an interpreted copy of the kernels for
them, whatever TRITON_INTERPRET says), so these tests check the kernel's indexing, masking, padding and scan order
without a GPU. The interpreter multiplies fp32 in fp32: TF32 and the GPU's accumulation order are checked by
tests/gpu/test_gated_delta_triton_cuda.py. Skipped when Triton is not installed.

Tolerances, as max abs error over the reference's max abs (``rel_err``):
  fp32 inputs: 1e-5 (fp32 round-off; the sums run in another order than the reference's).
  bf16 inputs: 2e-2 against the reference on the same (bf16-valued) inputs in fp32: the kernel rounds the state and
  the frame's weighted residual beta (V - gamma K M) to bf16 before each dot (~4e-3 each, 8 mantissa bits); measured
  3e-3 .. 5e-3.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.gdn_cases import FP32_TOL, _check, _inputs, _state
from world_model.ops import gated_delta
from world_model.ops.gated_delta import naive, triton_kernel

pytest.importorskip("triton")

BF16_TOL = 2e-2


# -----------------------------------------------------------------------------------------------------------------
# Against the reference (the tests every implementation passes are in test_gated_delta_implementations.py)
# -----------------------------------------------------------------------------------------------------------------

def test_several_token_tiles_with_a_partial_last_one(monkeypatch):
    """S = 40 over tiles of 16: two full tiles and one of 8, in every pass of every mode."""
    monkeypatch.setattr(triton_kernel, "INTERPRET_BLOCK_S", 16)
    x = _inputs(30, batch=2, frames=3, tokens=40, dk=48, dv=24)
    state = _state(3, 2, 2, 48, 24)
    _check(triton_kernel.frame_gated_delta_rule(*x, initial_state=state),
           naive.frame_gated_delta_rule(*x, initial_state=state), FP32_TOL)
    _check(triton_kernel.frame_gated_delta_rule(*x, reverse=True),
           naive.frame_gated_delta_rule(*x, reverse=True), FP32_TOL)
    _check(triton_kernel.frame_gated_delta_bidirectional(*x, initial_state=state),
           naive.frame_gated_delta_bidirectional(*x, initial_state=state), FP32_TOL)


@pytest.mark.parametrize("mode", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("dv", [48, 1])
def test_bf16_inputs(mode, dv):
    x = _inputs(40, batch=2, frames=3, tokens=40, dk=48, dv=dv, dtype=torch.bfloat16)
    state = _state(4, 2, 2, 48, dv) if mode != "reverse" else None
    exact = [t.float() for t in x]
    if mode == "bidirectional":
        actual = triton_kernel.frame_gated_delta_bidirectional(*x, initial_state=state)
        expected = naive.frame_gated_delta_bidirectional(*exact, initial_state=state)
    else:
        actual = triton_kernel.frame_gated_delta_rule(*x, initial_state=state, reverse=mode == "reverse")
        expected = naive.frame_gated_delta_rule(*exact, initial_state=state, reverse=mode == "reverse")
    _check(actual, expected, BF16_TOL)


def test_full_model_head_at_real_token_count():
    """One (batch, head) of the full model: S = 880 (a 40 x 22 latent), Dk = Dv = 112, a chunk of 3 frames."""
    x = _inputs(60, batch=1, heads=1, frames=3, tokens=880, dk=112, dv=112)
    state = _state(6, 1, 1, 112, 112)
    _check(triton_kernel.frame_gated_delta_bidirectional(*x, initial_state=state),
           naive.frame_gated_delta_bidirectional(*x, initial_state=state), FP32_TOL)


# -----------------------------------------------------------------------------------------------------------------
# Streaming, batching, edge cases
# -----------------------------------------------------------------------------------------------------------------


def test_batch_elements_are_independent():
    x = _inputs(71, batch=3)
    out, final = triton_kernel.frame_gated_delta_bidirectional(*x)
    for b in range(3):
        alone, alone_final = triton_kernel.frame_gated_delta_bidirectional(*(t[b : b + 1] for t in x))
        assert torch.equal(out[b : b + 1], alone) and torch.equal(final[b : b + 1], alone_final)


# -----------------------------------------------------------------------------------------------------------------
# Dispatch
# -----------------------------------------------------------------------------------------------------------------


def test_dispatch_takes_the_reference_on_cpu_and_the_kernel_when_forced(monkeypatch):
    x = _inputs(80)
    ref = naive.frame_gated_delta_bidirectional(*x)
    kernel = triton_kernel.frame_gated_delta_bidirectional(*x)
    for choice in ("auto", "naive"):
        monkeypatch.setenv(gated_delta.BACKEND_ENV, choice)
        auto = gated_delta.frame_gated_delta_bidirectional(*x)
        assert all(torch.equal(a, b) for a, b in zip(auto, ref))
    monkeypatch.delenv(gated_delta.BACKEND_ENV, raising=False)
    auto = gated_delta.frame_gated_delta_bidirectional(*x)
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "triton")
    forced = gated_delta.frame_gated_delta_bidirectional(*x)
    assert all(torch.equal(a, b) for a, b in zip(forced, kernel))
    forced = gated_delta.frame_gated_delta_rule(*x, reverse=True)
    assert all(torch.equal(a, b) for a, b in zip(forced, triton_kernel.frame_gated_delta_rule(*x, reverse=True)))


def test_dispatch_refuses_the_kernel_for_gradients_and_unknown_backends(monkeypatch):
    q, k, v, beta, gamma = _inputs(81)
    q.requires_grad_(True)
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="no backward"):
        gated_delta.frame_gated_delta_rule(q, k, v, beta, gamma)
    with torch.no_grad():
        gated_delta.frame_gated_delta_rule(q, k, v, beta, gamma)
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="must be one of"):
        gated_delta.frame_gated_delta_rule(q, k, v, beta, gamma)


def test_compiles_without_graph_breaks(monkeypatch):
    """Under torch.compile the launch is an opaque custom op: one graph, the kernel's numbers."""
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "triton")
    x = _inputs(82)
    state = _state(9, 1, 2, 48, 48)

    def chunk(q, k, v, beta, gamma, state):
        out, state = gated_delta.frame_gated_delta_bidirectional(q, k, v, beta, gamma, initial_state=state)
        return out * 2, state

    compiled = torch.compile(chunk, fullgraph=True, backend="aot_eager")
    out, final = compiled(*x, state)
    ref_out, ref_final = triton_kernel.frame_gated_delta_bidirectional(*x, initial_state=state)
    assert torch.equal(out, ref_out * 2) and torch.equal(final, ref_final)
