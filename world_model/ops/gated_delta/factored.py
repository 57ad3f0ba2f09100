"""The frame-wise gated delta rule as a few batched GEMMs over whole frames (plain torch, differentiable).

A frame's S tokens meet the state only through two small matrices:

    M_t = gamma_t (M_{t-1} - G_t M_{t-1}) + P_t,    G_t = K_t^T diag(beta_t) K_t  (Dk x Dk),
                                                    P_t = K_t^T diag(beta_t) V_t  (Dk x Dv),

so ``G`` and ``P`` of every frame come from two GEMMs over the tokens at once, the scan over frames multiplies
only Dk x Dk by Dk x Dv matrices, and all reads ``O_t = Q_t M_t`` are one more GEMM over the stacked states (the
bidirectional mode reads ``Q_t (M_t + R_t)``: one GEMM for both directions). ``naive.py`` erases and writes token
by token within a frame (``K^T (K M)``); this sums the same products in the other order (``(K^T K) M``), so the
two agree to fp32 round-off. Same meaning, signature and fp32 outputs as ``naive.py``.
"""

from __future__ import annotations

import torch

from .naive import _check_shapes


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
    """See ``naive.frame_gated_delta_rule``."""
    _check_shapes(q, k, v, beta, gamma, initial_state)
    if reverse and initial_state is not None:
        raise ValueError("the reverse scan starts from a zero state; initial_state must be None")
    q, k, v, beta, gamma = (t.float() for t in (q, k, v, beta, gamma))
    erase, write = _factors(k, v, beta)
    state = _start(k, v, initial_state)
    if reverse:
        reads, state = _reverse_reads(erase, write, gamma, state)
    else:
        reads, state = _forward_reads(erase, write, gamma, state)
    return _read(q, reads, v.shape[-1]), state


def frame_gated_delta_bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``naive.frame_gated_delta_bidirectional``."""
    _check_shapes(q, k, v, beta, gamma, initial_state)
    q, k, v, beta, gamma = (t.float() for t in (q, k, v, beta, gamma))
    erase, write = _factors(k, v, beta)
    forward, state = _forward_reads(erase, write, gamma, _start(k, v, initial_state))
    backward, _ = _reverse_reads(erase, write, gamma, _start(k, v, None))
    return _read(q, [f + b for f, b in zip(forward, backward)], v.shape[-1]), state


def _factors(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` ``(B, H, T, Dk, Dk)`` and ``P`` ``(B, H, T, Dk, Dv)`` of every frame."""
    kb = (k * beta.unsqueeze(-1)).transpose(-1, -2)  # (B, H, T, Dk, S)
    return kb @ k, kb @ v


def _start(k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    if initial_state is None:
        return k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    return initial_state.float().clone()


def _write(state: torch.Tensor, erase: torch.Tensor, write: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return gamma[..., None, None] * (state - erase @ state) + write


def _forward_reads(erase, write, gamma, state):
    """The state each frame reads in the inclusive forward scan (frame t's own write included), and the last."""
    reads = []
    for t in range(gamma.shape[2]):
        state = _write(state, erase[:, :, t], write[:, :, t], gamma[:, :, t])
        reads.append(state)
    return reads, state


def _reverse_reads(erase, write, gamma, state):
    """The state each frame reads in the exclusive reverse scan (frames after it only), and the state after all."""
    reads = [state] * gamma.shape[2]
    for t in reversed(range(gamma.shape[2])):
        reads[t] = state
        state = _write(state, erase[:, :, t], write[:, :, t], gamma[:, :, t])
    return reads, state


def _read(q: torch.Tensor, reads: list[torch.Tensor], dv: int) -> torch.Tensor:
    """``o_t = q_t M_t`` for all frames in one GEMM: ``(B, H, T, S, Dv)``."""
    if not reads:
        return q.new_empty(*q.shape[:-1], dv)
    return q @ torch.stack(reads, dim=2)
