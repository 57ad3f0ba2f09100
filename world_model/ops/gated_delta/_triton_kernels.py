"""Triton kernels of the frame-wise gated delta rule. Imported only by ``triton_kernel.py``, never at package import.

One program owns one (batch, head) and one block of BV state columns: column j of

    M_t = gamma_t M_{t-1} + (beta K_t)^T (V_t - gamma_t K_t M_{t-1})

needs only column j of M_{t-1}, so the ``(DKP, BV)`` slice of the state stays in fp32 registers across all frames.
Per frame, a write pass over S-tiles accumulates ``k^T (beta (v - gamma k M))`` (every token of the frame reads the
previous state; beta weighs the residual's rows so that one k tile serves both dots), then a read pass writes
``o = q M``. The bidirectional mode runs the exclusive reverse scan first, parks the state each frame reads in a
small fp32 scratch (L2-resident), then runs the forward scan reading ``q (M_t + R_t)``: one pass over q per frame.

Dk and Dv are padded to powers of two >= 16 (tl.dot's minimum); padded rows and columns of M stay exactly zero
because their keys, values and initial state load as zero.

The dots round their operands to ``DOT_DTYPE`` (the inputs' precision; fp32 dots use ``PRECISION``: "ieee" or
"tf32") and accumulate in fp32. ``UPCAST`` feeds the rounded operands to an fp32 dot instead: identical products
(a bf16 x bf16 product is exact in fp32), for Triton's CPU interpreter, whose bf16 dot multiplies raw bits.

Only Triton builtins appear here, none of triton.language's own jit functions (tl.zeros, tl.sum, tl.cdiv, ...):
``triton_kernel.py`` loads a second, interpreted copy of this module for CPU tensors, and those library functions
stay compiled-mode unless TRITON_INTERPRET was set before Triton was first imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Fixed when this module is loaded: whether its jit functions are interpreted ones (then UPCAST must be set).
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _mm(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with operands rounded to DOT_DTYPE, accumulated in fp32."""
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _write_frame(
    M, k_ptr, v_ptr, beta_ptr, gamma, S, k_ss, k_sd, v_ss, v_sd, beta_ss,
    offs_k, offs_v, mask_k, mask_v,
    BS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One frame's write: ``gamma M + (beta K)^T (V - gamma K M)``, M ``(DKP, BV)`` fp32."""
    acc = tl.full(M.shape, 0.0, tl.float32)
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        mask_s = offs_s < S
        k = tl.load(k_ptr + offs_s[:, None] * k_ss + offs_k[None, :] * k_sd,
                    mask=mask_s[:, None] & mask_k[None, :], other=0.0)  # (BS, DKP)
        v = tl.load(v_ptr + offs_s[:, None] * v_ss + offs_v[None, :] * v_sd,
                    mask=mask_s[:, None] & mask_v[None, :], other=0.0).to(tl.float32)  # (BS, BV)
        beta = tl.load(beta_ptr + offs_s * beta_ss, mask=mask_s, other=0.0).to(tl.float32)  # (BS,)
        u = beta[:, None] * (v - gamma * _mm(k, M, DOT_DTYPE, PRECISION, UPCAST))  # (BS, BV): what the frame writes
        acc += _mm(tl.trans(k), u, DOT_DTYPE, PRECISION, UPCAST)  # (DKP, BV): (beta K)^T (V - gamma K M)
    return gamma * M + acc


@triton.jit
def _read_frame(
    M, q_ptr, o_ptr, S, q_ss, q_sd, o_ss, o_sd, offs_k, offs_v, mask_k, mask_v,
    BS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``o = q M`` for one frame's S tokens, stored fp32."""
    for s0 in range(0, S, BS):
        offs_s = s0 + tl.arange(0, BS)
        mask_s = offs_s < S
        q = tl.load(q_ptr + offs_s[:, None] * q_ss + offs_k[None, :] * q_sd,
                    mask=mask_s[:, None] & mask_k[None, :], other=0.0)  # (BS, DKP)
        o = _mm(q, M, DOT_DTYPE, PRECISION, UPCAST)  # (BS, BV)
        tl.store(o_ptr + offs_s[:, None] * o_ss + offs_v[None, :] * o_sd, o, mask=mask_s[:, None] & mask_v[None, :])


@triton.jit
def frame_gdn_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, gamma_ptr, h0_ptr, o_ptr, ht_ptr, rev_ptr,
    q_st, k_st, v_st, o_st, beta_st, gamma_st, h0_st,  # stride tuples, (B, H, T, S, D) order
    H, T, S,
    DK: tl.constexpr, DV: tl.constexpr,
    MODE: tl.constexpr,  # "forward", "reverse" (exclusive, from zero) or "bidirectional" (both, outputs summed)
    HAS_H0: tl.constexpr,
    DKP: tl.constexpr, DVP: tl.constexpr, BV: tl.constexpr, BS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid ``(B * H, cdiv(DV, BV))``. o ``(B, H, T, S, DV)`` fp32; ht ``(B, H, DK, DV)`` fp32 contiguous: the state
    after the forward scan (after frame 0 for "reverse"). rev ``(B * H, T, DKP, DVP)`` fp32 scratch, "bidirectional"
    only: slot t holds the reverse state that frame t reads."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = tl.arange(0, DKP)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    q_ptr += b * q_st[0] + h * q_st[1]
    k_ptr += b * k_st[0] + h * k_st[1]
    v_ptr += b * v_st[0] + h * v_st[1]
    o_ptr += b * o_st[0] + h * o_st[1]
    beta_ptr += b * beta_st[0] + h * beta_st[1]
    gamma_ptr += b * gamma_st[0] + h * gamma_st[1]
    mask_kv = mask_k[:, None] & mask_v[None, :]

    if MODE == "reverse":
        # Frame t reads the state of frames > t, then writes itself into it.
        M = tl.full((DKP, BV), 0.0, tl.float32)
        for i in range(T):
            t = T - 1 - i
            _read_frame(M, q_ptr + t * q_st[2], o_ptr + t * o_st[2], S, q_st[3], q_st[4], o_st[3], o_st[4],
                        offs_k, offs_v, mask_k, mask_v, BS, DOT_DTYPE, PRECISION, UPCAST)
            gamma = tl.load(gamma_ptr + t * gamma_st[2]).to(tl.float32)
            M = _write_frame(M, k_ptr + t * k_st[2], v_ptr + t * v_st[2], beta_ptr + t * beta_st[2], gamma, S,
                             k_st[3], k_st[4], v_st[3], v_st[4], beta_st[3],
                             offs_k, offs_v, mask_k, mask_v, BS, DOT_DTYPE, PRECISION, UPCAST)
    else:
        rev_ptr += pid_bh * T * DKP * DVP + offs_k[:, None] * DVP + offs_v[None, :]  # (DKP, BV) block of slot 0
        if MODE == "bidirectional":
            # Exclusive reverse scan first: after writing frame t, R is what frame t - 1 reads; park it in slot t - 1.
            R = tl.full((DKP, BV), 0.0, tl.float32)
            tl.store(rev_ptr + (T - 1) * DKP * DVP, R)  # the last frame has nothing after it
            for i in range(T - 1):
                t = T - 1 - i
                gamma = tl.load(gamma_ptr + t * gamma_st[2]).to(tl.float32)
                R = _write_frame(R, k_ptr + t * k_st[2], v_ptr + t * v_st[2], beta_ptr + t * beta_st[2], gamma, S,
                                 k_st[3], k_st[4], v_st[3], v_st[4], beta_st[3],
                                 offs_k, offs_v, mask_k, mask_v, BS, DOT_DTYPE, PRECISION, UPCAST)
                tl.store(rev_ptr + (t - 1) * DKP * DVP, R)
            tl.debug_barrier()  # the forward scan below reads the slots other threads wrote
        if HAS_H0:
            M = tl.load(h0_ptr + b * h0_st[0] + h * h0_st[1] + offs_k[:, None] * h0_st[2] + offs_v[None, :] * h0_st[3],
                        mask=mask_kv, other=0.0).to(tl.float32)
        else:
            M = tl.full((DKP, BV), 0.0, tl.float32)
        for t in range(T):
            gamma = tl.load(gamma_ptr + t * gamma_st[2]).to(tl.float32)
            M = _write_frame(M, k_ptr + t * k_st[2], v_ptr + t * v_st[2], beta_ptr + t * beta_st[2], gamma, S,
                             k_st[3], k_st[4], v_st[3], v_st[4], beta_st[3],
                             offs_k, offs_v, mask_k, mask_v, BS, DOT_DTYPE, PRECISION, UPCAST)
            read = M
            if MODE == "bidirectional":
                read = M + tl.load(rev_ptr + t * DKP * DVP)
            _read_frame(read, q_ptr + t * q_st[2], o_ptr + t * o_st[2], S, q_st[3], q_st[4], o_st[3], o_st[4],
                        offs_k, offs_v, mask_k, mask_v, BS, DOT_DTYPE, PRECISION, UPCAST)

    tl.store(ht_ptr + pid_bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], M, mask=mask_kv)
