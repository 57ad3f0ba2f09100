"""The factored (batched-GEMM) gated delta rule on CUDA: the largest batch, and its time against the kernel's.

    python -m pytest -q -s tests/gpu/test_gated_delta_factored_cuda.py     (-s shows the timing table)

Its parity at the models' sizes runs with the kernel's in tests/gpu/test_gated_delta_triton_cuda.py (1e-4 of the
reference's max abs with full fp32 matmuls, 1e-2 with TF32, the engine's setting).
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_gated_delta_triton_cuda import TOLERANCE, _check, _inputs, _matmul_precision, _run, _time_ms
from world_model.ops.gated_delta import factored, naive, triton_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_strided_inputs_and_largest_batch():
    """B = 16 sessions, heads split by a transpose of (B, N, H, D) and frames sliced out, as the model passes them."""
    (q, k, v, beta, gamma), state = _inputs(3, 16, 20, 5, 880, 112, 112)
    q, k, v = (t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)[:, :, 1:4] for t in (q, k, v))
    beta, gamma = beta[:, :, 1:4], gamma[:, :, 1:4]
    with _matmul_precision("highest"):
        expected = naive.frame_gated_delta_bidirectional(q, k, v, beta, gamma, initial_state=state)
        actual = factored.frame_gated_delta_bidirectional(q, k, v, beta, gamma, initial_state=state)
    _check(actual, expected, TOLERANCE["highest"])


def test_timing_against_the_kernel():
    """Not an assertion: one chunk of one GDN layer of the full model (H = 20, T = 3, S = 880, D = 112), TF32."""
    rows = []
    for batch in (1, 8):
        for branch, dv in (("main", 112), ("normaliser", 1)):
            x, state = _inputs(6, batch, 20, 3, 880, 112, dv)
            with _matmul_precision("high"):
                times = {impl.__name__.rpartition(".")[2]: _time_ms(lambda: _run(impl, "bidirectional", x, state))
                         for impl in (naive, triton_kernel, factored)}
            rows.append(f"B={batch} {branch:10s} bidirectional " + "  ".join(f"{n} {t:7.3f} ms" for n, t in times.items()))
    print("\n" + torch.cuda.get_device_name() + "\n" + "\n".join(rows))
