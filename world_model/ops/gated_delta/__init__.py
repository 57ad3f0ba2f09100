"""The frame-wise gated delta rule: a plain-torch reference (``naive``), the same as batched GEMMs over whole frames
(``factored``, plain torch too) and a Triton kernel (``triton_kernel``).

The functions here have the reference's meaning and signature and pick the implementation per call:

* the Triton kernel when the tensors are on CUDA, Triton is installed and no gradient is needed (it has no backward);
* the reference otherwise.

``SANA_WM_GDN_BACKEND`` picks: ``auto`` (the default) as above; ``naive`` always the reference; ``factored`` always the
batched-GEMM form (with gradients; not yet timed on a GPU); ``triton`` always the kernel (CPU tensors then run in
Triton's interpreter) and refuses calls that need gradients. The kernel passed its
parity tests on an H100 (tests/gpu/test_gated_delta_triton_cuda.py, 47 tests) and made the full model's engine step
2-18% faster there than the reference's TF32 matmuls (benchmarks/results/).
"""

from __future__ import annotations

import os

import torch

from . import factored, naive, triton_kernel

BACKEND_ENV = "SANA_WM_GDN_BACKEND"
BACKENDS = ("auto", "naive", "factored", "triton")
DEFAULT_BACKEND = "auto"


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
    impl = _implementation(q, k, v, beta, gamma, initial_state)
    return impl.frame_gated_delta_rule(q, k, v, beta, gamma, initial_state=initial_state, reverse=reverse)


def frame_gated_delta_bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``naive.frame_gated_delta_bidirectional``: forward scan from ``initial_state`` + exclusive reverse scan."""
    impl = _implementation(q, k, v, beta, gamma, initial_state)
    return impl.frame_gated_delta_bidirectional(q, k, v, beta, gamma, initial_state=initial_state)


def _implementation(*tensors: torch.Tensor | None):
    choice = os.environ.get(BACKEND_ENV, DEFAULT_BACKEND)
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}; got {choice!r}")
    if choice == "naive":
        return naive
    if choice == "factored":
        return factored
    return triton_kernel if _use_kernel(choice, tensors) else naive


def _use_kernel(choice: str, tensors) -> bool:
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if choice == "triton":
        if needs_grad:
            raise ValueError(f"{BACKEND_ENV}=triton: the Triton kernel has no backward; run without gradients or "
                             f"with {BACKEND_ENV}=naive")
        if not triton_kernel.available():
            raise ValueError(f"{BACKEND_ENV}=triton but Triton is not installed")
        return True
    return not needs_grad and tensors[0].is_cuda and triton_kernel.available()


__all__ = ["frame_gated_delta_rule", "frame_gated_delta_bidirectional", "BACKEND_ENV"]
