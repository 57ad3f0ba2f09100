"""The plain fp32 frame-wise gated delta rule against an independent dense formulation.

The reference below never uses the delta-rule "erase then write" update of ``naive.py``. It builds, per frame t
and per (batch, head), the explicit D_k x D_k transition and the D_k x D_v write in float64,

    W_t = gamma_t (I - sum_s beta_ts k_ts k_ts^T)        U_t = sum_s beta_ts k_ts v_ts^T
    M_t = W_t M_{t-1} + U_t                               o_ts = M_t^T q_ts

and for ``reverse=True`` lets frame t read the state built from frames t+1 .. T-1 only, starting from zero at the
end of the clip (the exclusive anti-causal scan).
"""

from __future__ import annotations

import pytest
import torch

from world_model.ops.gated_delta import frame_gated_delta_rule

# The op computes in fp32; the reference in fp64. Values are O(1), so these bound fp32 round-off over T frames.
ATOL = 1e-5
RTOL = 1e-5

B, H, T, S, DK, DV = 2, 2, 5, 3, 4, 4


def _inputs(seed: int = 0, *, dtype=torch.float64, dv: int = DV, frames: int = T, batch: int = B):
    """Random q, k, v, beta, gamma of the model's kind: ReLU-like keys scaled by 1/sqrt(S), gates in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, H, frames, S, DK, generator=g, dtype=dtype)
    # Unit keys scaled by S^-1/2 (as the model does with 1/sqrt(D S)) keep I - sum_s beta k k^T a contraction.
    k = torch.randn(batch, H, frames, S, DK, generator=g, dtype=dtype)
    k = k / k.norm(dim=-1, keepdim=True) * S**-0.5
    v = torch.randn(batch, H, frames, S, dv, generator=g, dtype=dtype)
    beta = torch.rand(batch, H, frames, S, generator=g, dtype=dtype) * 0.9 + 0.05
    gamma = torch.rand(batch, H, frames, generator=g, dtype=dtype) * 0.7 + 0.25
    return q, k, v, beta, gamma


def _transition(k, v, beta, gamma):
    """Dense per-frame ``W_t`` ``(B, H, T, Dk, Dk)`` and ``U_t`` ``(B, H, T, Dk, Dv)`` in float64."""
    k, v, beta, gamma = (x.double() for x in (k, v, beta, gamma))
    batch, heads, frames, tokens, dk = k.shape
    eye = torch.eye(dk, dtype=torch.float64)
    w = torch.empty(batch, heads, frames, dk, dk, dtype=torch.float64)
    u = torch.empty(batch, heads, frames, dk, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(frames):
                erase = torch.zeros(dk, dk, dtype=torch.float64)
                write = torch.zeros(dk, v.shape[-1], dtype=torch.float64)
                for s in range(tokens):
                    kk = k[b, h, t, s]
                    erase += beta[b, h, t, s] * torch.outer(kk, kk)
                    write += beta[b, h, t, s] * torch.outer(kk, v[b, h, t, s])
                w[b, h, t] = gamma[b, h, t] * (eye - erase)
                u[b, h, t] = write
    return w, u


def dense_reference(q, k, v, beta, gamma, *, initial_state=None, reverse=False):
    """``(o, final_state)`` of the frame-wise rule from explicit transition matrices (float64)."""
    w, u = _transition(k, v, beta, gamma)
    q = q.double()
    batch, heads, frames, tokens, dk = k.shape
    dv = v.shape[-1]
    out = torch.empty(batch, heads, frames, tokens, dv, dtype=torch.float64)
    final = torch.empty(batch, heads, dk, dv, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            if initial_state is None:
                state = torch.zeros(dk, dv, dtype=torch.float64)
            else:
                state = initial_state[b, h].double().clone()
            if not reverse:
                for t in range(frames):
                    state = w[b, h, t] @ state + u[b, h, t]  # M_t includes frame t
                    for s in range(tokens):
                        out[b, h, t, s] = state.T @ q[b, h, t, s]
            else:
                for t in reversed(range(frames)):
                    for s in range(tokens):  # frame t reads frames t+1 .. T-1 only
                        out[b, h, t, s] = state.T @ q[b, h, t, s]
                    state = w[b, h, t] @ state + u[b, h, t]
            final[b, h] = state
    return out, final


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL, rtol=RTOL)


# -----------------------------------------------------------------------------------------------------------------
# Against the dense formulation
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_dense(dtype):
    q, k, v, beta, gamma = _inputs(0, dtype=dtype)
    out, final = frame_gated_delta_rule(q, k, v, beta, gamma)
    ref_out, ref_final = dense_reference(q, k, v, beta, gamma)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    assert out.shape == (B, H, T, S, DV) and final.shape == (B, H, DK, DV)
    _close(out, ref_out)
    _close(final, ref_final)


def test_forward_with_initial_state_matches_dense():
    q, k, v, beta, gamma = _inputs(1)
    init = torch.randn(B, H, DK, DV, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    out, final = frame_gated_delta_rule(q, k, v, beta, gamma, initial_state=init)
    ref_out, ref_final = dense_reference(q, k, v, beta, gamma, initial_state=init)
    _close(out, ref_out)
    _close(final, ref_final)
    # The initial state really is read: without it the answer differs.
    out0, _ = frame_gated_delta_rule(q, k, v, beta, gamma)
    assert (out - out0).abs().max() > 100 * ATOL


def test_initial_state_is_not_modified():
    q, k, v, beta, gamma = _inputs(2)
    init = torch.randn(B, H, DK, DV, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    copy = init.clone()
    frame_gated_delta_rule(q, k, v, beta, gamma, initial_state=init)
    assert torch.equal(init, copy)


def test_reverse_matches_dense():
    q, k, v, beta, gamma = _inputs(4)
    out, final = frame_gated_delta_rule(q, k, v, beta, gamma, reverse=True)
    ref_out, ref_final = dense_reference(q, k, v, beta, gamma, reverse=True)
    _close(out, ref_out)
    # The last frame has nothing after it: exactly zero.
    assert torch.count_nonzero(out[:, :, -1]) == 0
    # The state returned is the one after every frame was written (T-1 down to 0), as the loop is written.
    _close(final, ref_final)


def test_reverse_equals_forward_on_flipped_and_shifted_sequence():
    """diffusers' formulation of the exclusive backward scan: flip time, shift k/v/beta right by one (zeros in
    front, gamma 1), run the inclusive forward scan, flip back."""
    q, k, v, beta, gamma = _inputs(5)

    def flip_shift(x, fill):
        x = x.flip(2)
        pad = torch.full_like(x[:, :, :1], fill)
        return torch.cat([pad, x[:, :, :-1]], dim=2)

    fwd, _ = frame_gated_delta_rule(
        q.flip(2), flip_shift(k, 0.0), flip_shift(v, 0.0), flip_shift(beta, 0.0), flip_shift(gamma, 1.0)
    )
    out, _ = frame_gated_delta_rule(q, k, v, beta, gamma, reverse=True)
    _close(out, fwd.flip(2))


def test_forward_plus_reverse_sees_every_frame_once():
    """With gamma = 1 and tiny beta the rule is a plain linear attention: fwd (inclusive) + bwd (exclusive)
    sums beta k v^T over all frames exactly once, to first order in beta."""
    q, k, v, _, _ = _inputs(6)
    beta = torch.full(k.shape[:4], 1e-4, dtype=torch.float64)
    gamma = torch.ones(k.shape[:3], dtype=torch.float64)
    fwd, _ = frame_gated_delta_rule(q, k, v, beta, gamma)
    bwd, _ = frame_gated_delta_rule(q, k, v, beta, gamma, reverse=True)
    kv = torch.einsum("bhts,bhtsd,bhtse->bhde", beta, k, v)  # sum over all frames and tokens
    expected = torch.einsum("bhtsd,bhde->bhtse", q, kv)
    # Second-order terms are O(beta^2) relative: ~1e-4 of the first-order value.
    torch.testing.assert_close((fwd + bwd).double(), expected, atol=1e-7, rtol=1e-3)


# -----------------------------------------------------------------------------------------------------------------
# Streaming, batching, the normaliser
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 2, 4])
def test_streaming_equals_one_shot(split):
    q, k, v, beta, gamma = _inputs(7)
    one_out, one_final = frame_gated_delta_rule(q, k, v, beta, gamma)
    first = [x[:, :, :split] for x in (q, k, v, beta, gamma)]
    second = [x[:, :, split:] for x in (q, k, v, beta, gamma)]
    out_a, state = frame_gated_delta_rule(*first)
    out_b, final = frame_gated_delta_rule(*second, initial_state=state)
    _close(torch.cat([out_a, out_b], dim=2), one_out)
    _close(final, one_final)


def test_streaming_frame_by_frame_equals_one_shot():
    q, k, v, beta, gamma = _inputs(8)
    one_out, one_final = frame_gated_delta_rule(q, k, v, beta, gamma)
    state, outs = None, []
    for t in range(T):
        o, state = frame_gated_delta_rule(*(x[:, :, t : t + 1] for x in (q, k, v, beta, gamma)), initial_state=state)
        outs.append(o)
    _close(torch.cat(outs, dim=2), one_out)
    _close(state, one_final)


@pytest.mark.parametrize("reverse", [False, True])
def test_batch_elements_are_independent(reverse):
    q, k, v, beta, gamma = _inputs(9, batch=3)
    out, final = frame_gated_delta_rule(q, k, v, beta, gamma, reverse=reverse)
    for b in range(3):
        alone, alone_final = frame_gated_delta_rule(*(x[b : b + 1] for x in (q, k, v, beta, gamma)), reverse=reverse)
        _close(out[b : b + 1], alone)
        _close(final[b : b + 1], alone_final)
    # Perturbing one element leaves the others untouched, bit for bit.
    k2 = k.clone()
    k2[1] = k2[1].flip(-1)
    out2, _ = frame_gated_delta_rule(q, k2, v, beta, gamma, reverse=reverse)
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])
    assert not torch.equal(out2[1], out[1])


def test_heads_are_independent():
    q, k, v, beta, gamma = _inputs(10)
    out, _ = frame_gated_delta_rule(q, k, v, beta, gamma)
    for h in range(H):
        alone, _ = frame_gated_delta_rule(*(x[:, h : h + 1] for x in (q, k, v, beta, gamma)))
        _close(out[:, h : h + 1], alone)


@pytest.mark.parametrize("reverse", [False, True])
def test_normaliser_with_unit_values(reverse):
    """The GDN normaliser: the same rule with v = 1 and a D_k x 1 state."""
    q, k, _, beta, gamma = _inputs(11)
    ones = torch.ones(*k.shape[:4], 1, dtype=k.dtype)
    out, final = frame_gated_delta_rule(q, k, ones, beta, gamma, reverse=reverse)
    ref_out, ref_final = dense_reference(q, k, ones, beta, gamma, reverse=reverse)
    assert out.shape == (B, H, T, S, 1) and final.shape == (B, H, DK, 1)
    _close(out, ref_out)
    _close(final, ref_final)


def test_normaliser_equals_value_rule_with_constant_values():
    """Linearity in v: the rule with v = c * 1 (any D_v) gives c times the normaliser in every column."""
    q, k, _, beta, gamma = _inputs(12)
    ones = torch.ones(*k.shape[:4], 1, dtype=k.dtype)
    norm, _ = frame_gated_delta_rule(q, k, ones, beta, gamma)
    out, _ = frame_gated_delta_rule(q, k, 2.5 * torch.ones(*k.shape[:4], 3, dtype=k.dtype), beta, gamma)
    _close(out, 2.5 * norm.expand_as(out))


def test_decay_forgets_the_past():
    """gamma_t = 0 wipes the state: frame t then sees only its own write (forward scan)."""
    q, k, v, beta, gamma = _inputs(13)
    gamma = gamma.clone()
    gamma[:, :, 2] = 0.0
    out, _ = frame_gated_delta_rule(q, k, v, beta, gamma)
    later, _ = frame_gated_delta_rule(*(x[:, :, 2:] for x in (q, k, v, beta, gamma)))
    _close(out[:, :, 2:], later)


# -----------------------------------------------------------------------------------------------------------------
# Shape validation
# -----------------------------------------------------------------------------------------------------------------


def _bad_cases():
    q, k, v, beta, gamma = _inputs(14, dtype=torch.float32)
    state = torch.zeros(B, H, DK, DV)
    return [
        ("q and k must be", (q[..., :3], k, v, beta, gamma), {}),
        ("q and k must be", (q[:, :, :4], k, v, beta, gamma), {}),
        ("q and k must be", (q[0], k[0], v[0], beta[0], gamma[0]), {}),
        ("v must be", (q, k, v[:, :, :, :2], beta, gamma), {}),
        ("beta must be", (q, k, v, beta[..., :2], gamma), {}),
        ("beta must be", (q, k, v, beta[..., None], gamma), {}),
        ("gamma must be", (q, k, v, beta, gamma[:, :, :3]), {}),
        ("gamma must be", (q, k, v, beta, gamma[..., None]), {}),
        ("initial_state must be", (q, k, v, beta, gamma), {"initial_state": state[..., :3]}),
        ("initial_state must be", (q, k, v, beta, gamma), {"initial_state": state[:1]}),
        ("initial_state must be None", (q, k, v, beta, gamma), {"initial_state": state, "reverse": True}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_shapes_raise(case):
    message, args, kwargs = _bad_cases()[case]
    with pytest.raises(ValueError, match=message) as info:
        frame_gated_delta_rule(*args, **kwargs)
    assert str(info.value)  # a message, not a bare ValueError
