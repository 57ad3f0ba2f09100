"""Plain-torch specification of the frame-wise gated delta rule (fp32).

SANA-WM's linear-attention blocks keep one D_k x D_v matrix per head and update it once per
latent frame, writing all S tokens of the frame at once (sana-wm.md B.2):

    M_t = gamma_t * (I - sum_s beta_ts k_ts k_ts^T) M_{t-1} + sum_s beta_ts k_ts v_ts^T
    o_ts = M_t^T q_ts

The recurrence's normaliser is the same rule with v = 1 (a D_k x 1 state) and unrotated keys.
``reverse=True`` is the exclusive anti-causal scan of the bidirectional and chunk-causal modes:
frame t reads the state built from frames t+1 .. T-1 only, starting from zero.

This loop is the ground truth that any fast kernel is compared against.
"""

from __future__ import annotations

import torch


def frame_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frame-wise gated delta rule over T frames.

    Args:
        q: ``(B, H, T, S, Dk)`` queries.
        k: ``(B, H, T, S, Dk)`` keys.
        v: ``(B, H, T, S, Dv)`` values.
        beta: ``(B, H, T, S)`` write strength per token.
        gamma: ``(B, H, T)`` decay per frame.
        initial_state: ``(B, H, Dk, Dv)`` state before frame 0 (zeros if None). Forward scans only.
        reverse: run the exclusive reverse scan (frame t sees frames > t), from a zero state.

    Returns:
        ``(o, final_state)``: ``o`` is ``(B, H, T, S, Dv)`` fp32; ``final_state`` ``(B, H, Dk, Dv)`` fp32
        is the state after the last frame written (frame T-1 forwards, frame 0 for ``reverse``).
    """
    _check_shapes(q, k, v, beta, gamma, initial_state)
    if reverse and initial_state is not None:
        raise ValueError("the reverse scan starts from a zero state; initial_state must be None")
    batch, heads, frames, _, dk = k.shape
    dv = v.shape[-1]
    q, k, v, beta, gamma = (t.float() for t in (q, k, v, beta, gamma))
    state = (
        torch.zeros(batch, heads, dk, dv, dtype=torch.float32, device=k.device)
        if initial_state is None
        else initial_state.float().clone()
    )
    out = torch.empty(batch, heads, frames, q.shape[3], dv, dtype=torch.float32, device=k.device)
    order = range(frames - 1, -1, -1) if reverse else range(frames)
    for t in order:
        if not reverse:
            state = _write(state, k[:, :, t], v[:, :, t], beta[:, :, t], gamma[:, :, t])
        out[:, :, t] = q[:, :, t] @ state
        if reverse:
            state = _write(state, k[:, :, t], v[:, :, t], beta[:, :, t], gamma[:, :, t])
    return out, state


def _write(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor):
    # state (B,H,Dk,Dv); k (B,H,S,Dk); v (B,H,S,Dv); beta (B,H,S); gamma (B,H)
    kb = (k * beta.unsqueeze(-1)).transpose(-1, -2)  # (B, H, Dk, S)
    erased = state - kb @ (k @ state)  # (I - K B K^T) M
    return gamma[..., None, None] * erased + kb @ v


def _check_shapes(q, k, v, beta, gamma, initial_state) -> None:
    if k.ndim != 5 or q.shape[:4] != k.shape[:4] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be (B, H, T, S, Dk) alike; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:4] != k.shape[:4]:
        raise ValueError(f"v must be (B, H, T, S, Dv) with k's first four dims; got {tuple(v.shape)}")
    if beta.shape != k.shape[:4]:
        raise ValueError(f"beta must be {tuple(k.shape[:4])}; got {tuple(beta.shape)}")
    if gamma.shape != k.shape[:3]:
        raise ValueError(f"gamma must be {tuple(k.shape[:3])}; got {tuple(gamma.shape)}")
    expected = (*k.shape[:2], k.shape[-1], v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be {expected}; got {tuple(initial_state.shape)}")


def frame_gated_delta_bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the bidirectional / chunk-causal modes: the forward scan from ``initial_state`` plus the
    exclusive reverse scan from zero, summed; and the forward scan's final state (what the next chunk starts from).

    Returns ``(o, final_state)`` shaped as ``frame_gated_delta_rule``'s.
    """
    forward, state = frame_gated_delta_rule(q, k, v, beta, gamma, initial_state=initial_state)
    backward, _ = frame_gated_delta_rule(q, k, v, beta, gamma, reverse=True)
    return forward + backward, state
