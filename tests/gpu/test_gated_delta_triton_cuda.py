"""The compiled Triton kernel of the frame-wise gated delta rule against the reference, on CUDA at the models' sizes
(the factored form's fp32 parity too: ``test_fp32_matches_reference``).

    python -m pytest -q -s tests/gpu/test_gated_delta_triton_cuda.py     (-s shows the timing table)

The reference is ``naive`` on the same GPU with full-fp32 matmuls. Tolerances (max abs error over the reference's
max abs):
  fp32 inputs, full fp32 dots (float32 matmul precision "highest"): 1e-4 (fp32 sums in another order).
  fp32 inputs, TF32 dots ("high", the engine's default): 1e-2, as tests/gpu/test_cuda_parity.py allows TF32.
  bf16 inputs: 2e-2 against the reference on the same values in fp32 (state and operands rounded to bf16 per dot).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.conftest import rel_err
from tests.ops.gdn_cases import _inputs as cpu_inputs
from world_model.ops import gated_delta
from world_model.ops.gated_delta import factored, naive, triton_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton")

TOLERANCE = {"highest": 1e-4, "high": 1e-2, "bf16": 2e-2}

# (batch, heads, frames, tokens, dk, dv): the full model (20 heads of 112; a 40 x 22 latent), its normaliser, the demo
# and tiny presets.
FULL = (2, 20, 3, 880, 112, 112)
SHAPES = [
    FULL,
    (2, 20, 4, 880, 112, 1),
    (2, 20, 1, 880, 112, 112),
    (2, 2, 3, 40, 128, 128),
    (2, 2, 4, 40, 128, 1),
    (2, 2, 2, 32, 48, 48),
]


@contextlib.contextmanager
def _matmul_precision(precision: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _inputs(seed, batch, heads, frames, tokens, dk, dv, dtype=torch.float32):
    """The CPU tests' inputs (tests/ops) at these sizes, with an initial state, on the GPU."""
    x, state = cpu_inputs(seed, batch=batch, heads=heads, frames=frames, tokens=tokens, dk=dk, dv=dv, dtype=dtype,
                          with_state=True)
    return [t.cuda() for t in x], state.cuda()


def _run(impl, mode, x, state):
    if mode == "bidirectional":
        return impl.frame_gated_delta_bidirectional(*x, initial_state=state)
    if mode == "reverse":
        return impl.frame_gated_delta_rule(*x, reverse=True)
    return impl.frame_gated_delta_rule(*x, initial_state=state)


def _check(actual, expected, tol):
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32 and a.shape == e.shape
        err = rel_err(a, e) if e.abs().max() > 0 else float(a.abs().max())
        assert err < tol, err


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("mode", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", [triton_kernel, factored], ids=["triton", "factored"])
def test_fp32_matches_reference(impl, shape, mode, precision):
    x, state = _inputs(0, *shape)
    with _matmul_precision("highest"):
        expected = _run(naive, mode, x, state)
    with _matmul_precision(precision):
        actual = _run(impl, mode, x, state)
    _check(actual, expected, TOLERANCE[precision])


@pytest.mark.parametrize("mode", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("shape", [FULL, (2, 20, 3, 880, 112, 1)], ids=["main", "normaliser"])
def test_bf16_matches_reference(shape, mode):
    x, state = _inputs(1, *shape, dtype=torch.bfloat16)
    with _matmul_precision("highest"):
        expected = _run(naive, mode, [t.float() for t in x], state)
    _check(_run(triton_kernel, mode, x, state), expected, TOLERANCE["bf16"])


def test_largest_batch():
    """B = 16 sessions of 4 frames: 126 M elements per input, the offsets' largest."""
    x, state = _inputs(2, 16, 20, 4, 880, 112, 112)
    with _matmul_precision("highest"):
        _check(_run(triton_kernel, "bidirectional", x, state), _run(naive, "bidirectional", x, state), 1e-4)


def test_strided_inputs_as_the_model_passes_them():
    """Heads split by a transpose of (B, N, H, D) and a chunk of frames sliced out: no copies needed."""
    (q, k, v, beta, gamma), state = _inputs(3, 2, 20, 5, 880, 112, 112)
    q, k, v = (t.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)[:, :, 1:4] for t in (q, k, v))
    beta, gamma = beta[:, :, 1:4], gamma[:, :, 1:4]
    assert not q.is_contiguous()
    with _matmul_precision("highest"):
        expected = naive.frame_gated_delta_bidirectional(q, k, v, beta, gamma, initial_state=state)
        actual = triton_kernel.frame_gated_delta_bidirectional(q, k, v, beta, gamma, initial_state=state)
    _check(actual, expected, 1e-4)


def test_dispatch_takes_the_kernel_on_cuda_without_gradients(monkeypatch):
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "auto")
    x, state = _inputs(4, 1, 2, 3, 40, 48, 48)
    kernel = triton_kernel.frame_gated_delta_bidirectional(*x, initial_state=state)
    auto = gated_delta.frame_gated_delta_bidirectional(*x, initial_state=state)
    assert all(torch.equal(a, b) for a, b in zip(auto, kernel))
    x[0].requires_grad_(True)  # gradients: the reference, which has a backward
    out, _ = gated_delta.frame_gated_delta_bidirectional(*x, initial_state=state)
    assert out.requires_grad


def test_compiled_with_inductor_equals_eager():
    x, state = _inputs(5, 2, 20, 3, 880, 112, 112)

    def chunk(q, k, v, beta, gamma, state):
        out, state = gated_delta.frame_gated_delta_bidirectional(q, k, v, beta, gamma, initial_state=state)
        return out * 2, state

    eager = chunk(*x, state)
    compiled = torch.compile(chunk, fullgraph=True)(*x, state)
    _check(compiled, eager, 1e-6)


def _time_ms(fn, repeats=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def test_timing_naive_vs_kernel():
    """Not an assertion: one chunk of one GDN layer of the full model (B = 4, H = 20, T = 3, S = 880, D = 112)."""
    rows = []
    for branch, dv in (("main", 112), ("normaliser", 1)):
        x, state = _inputs(6, 4, 20, 3, 880, 112, dv)
        for precision in ("highest", "high"):
            with _matmul_precision(precision):
                for mode in ("forward", "bidirectional"):
                    ref = _time_ms(lambda: _run(naive, mode, x, state))
                    ker = _time_ms(lambda: _run(triton_kernel, mode, x, state))
                    rows.append(f"{branch:10s} {precision:7s} {mode:13s} "
                                f"naive {ref:7.3f} ms  triton {ker:7.3f} ms  x{ref / ker:5.1f}")
    print("\n" + torch.cuda.get_device_name() + "\n" + "\n".join(rows))
