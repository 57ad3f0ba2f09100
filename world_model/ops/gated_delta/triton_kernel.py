"""Triton kernel of the frame-wise gated delta rule, with ``naive.py``'s meaning and signature.

Importing this module never imports Triton; the first call does. CUDA tensors run the compiled kernel; CPU tensors
run the same kernel in Triton's interpreter (slow; for tests on machines without a GPU).

Numerics: the state is fp32 throughout and outputs are fp32. The dots take the inputs' precision: bf16/fp16 inputs
multiply in bf16/fp16 (the state rounded to it per frame, as NVlabs' kernels do); fp32 inputs multiply in TF32 when
``torch.get_float32_matmul_precision()`` allows it (the engine's ``tf32`` setting) and in full fp32 otherwise.
All dots accumulate in fp32. The kernel has no backward: callers that need gradients use the reference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from pathlib import Path

import torch

from .naive import _check_shapes

# Tiles per dot type: (tokens per tile, state columns per program, warps). Dk and Dv are padded to powers of two >= 16.
# Chosen so that ptxas (sm_90a, Triton 3.9, Dk = 128) spills no registers; not yet timed on a GPU.
TILES = {
    "tf32": (32, 32, 8),  # 190 registers
    "ieee": (16, 32, 8),  # fp32 dots on the CUDA cores need more registers: 184
    "bfloat16": (64, 32, 4),  # 221 registers
    "float16": (64, 32, 4),
}
NUM_STAGES = 2
INTERPRET_BLOCK_S = 256  # the interpreter runs a tile as one numpy call: bigger tiles, fewer Python iterations


def available() -> bool:
    """Whether Triton is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


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
    """``naive.frame_gated_delta_rule`` as one kernel launch: same arguments, same ``(o, final_state)``."""
    _check_shapes(q, k, v, beta, gamma, initial_state)
    if reverse and initial_state is not None:
        raise ValueError("the reverse scan starts from a zero state; initial_state must be None")
    return _run()(q, k, v, beta, gamma, initial_state, "reverse" if reverse else "forward")


def frame_gated_delta_bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``naive.frame_gated_delta_bidirectional`` in one launch: the forward scan from ``initial_state`` plus the
    exclusive reverse scan from zero, summed, and the forward scan's final state."""
    _check_shapes(q, k, v, beta, gamma, initial_state)
    return _run()(q, k, v, beta, gamma, initial_state, "bidirectional")


def _run():
    """The launch itself in eager mode; under torch.compile the same launch as an opaque custom op (so Dynamo
    neither traces into Triton nor breaks the graph)."""
    return torch.ops.sana_wm.frame_gated_delta if torch.compiler.is_compiling() else _launch


def _launch(q, k, v, beta, gamma, initial_state, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = [q, k, v, beta, gamma] + ([initial_state] if initial_state is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton gated delta rule needs all tensors on one CUDA device (or the CPU, "
                         f"interpreted); got {sorted(map(str, devices))}")
    if not all(t.is_floating_point() for t in tensors):
        raise ValueError(f"the Triton gated delta rule needs floating-point tensors; got {[t.dtype for t in tensors]}")
    batch, heads, frames, tokens, dk = k.shape
    dv = v.shape[-1]
    device = q.device
    dkp, dvp = _padded(dk), _padded(dv)
    out = torch.empty(batch, heads, frames, tokens, dv, dtype=torch.float32, device=device)
    if frames == 0 or batch * heads * dv == 0:  # nothing to launch: the state passes through
        return out, (initial_state.float().clone() if initial_state is not None
                     else torch.zeros(batch, heads, dk, dv, dtype=torch.float32, device=device))
    final = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=device)
    if mode == "bidirectional":
        rev = torch.empty(batch * heads, frames, dkp, dvp, dtype=torch.float32, device=device)
    else:
        rev = final  # unused
    kernels = _kernels(device.type == "cpu")
    dot_dtype, precision = _dot_precision(q, k)
    block_s, block_v, warps = TILES[precision if dot_dtype == "float32" else dot_dtype]
    block_v = min(block_v, dvp)
    if kernels.INTERPRETED:
        block_s = INTERPRET_BLOCK_S
    grid = (batch * heads, -(-dv // block_v))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernels.frame_gdn_kernel[grid](
            q, k, v, beta, gamma, initial_state if initial_state is not None else final, out, final, rev,
            q.stride(), k.stride(), v.stride(), out.stride(), beta.stride(), gamma.stride(),
            initial_state.stride() if initial_state is not None else final.stride(),
            heads, frames, tokens,
            DK=dk,
            DV=dv,
            MODE=mode,
            HAS_H0=initial_state is not None,
            DKP=dkp,
            DVP=dvp,
            BV=block_v,
            BS=min(block_s, _padded(tokens)),
            DOT_DTYPE=getattr(kernels.tl, dot_dtype),
            PRECISION=precision,
            UPCAST=kernels.INTERPRETED,
            num_warps=warps,
            num_stages=NUM_STAGES,
        )
    return out, final


@torch.library.custom_op("sana_wm::frame_gated_delta", mutates_args=())
def _launch_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    initial_state: torch.Tensor | None,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, beta, gamma, initial_state, mode)


@_launch_op.register_fake
def _(q, k, v, beta, gamma, initial_state, mode):
    batch, heads, frames, tokens, dk = k.shape
    dv = v.shape[-1]
    return (q.new_empty(batch, heads, frames, tokens, dv, dtype=torch.float32),
            q.new_empty(batch, heads, dk, dv, dtype=torch.float32))


def _dot_precision(q: torch.Tensor, k: torch.Tensor) -> tuple[str, str]:
    """The dots' operand type (a triton.language dtype name) and fp32 input precision, from q's and k's dtypes."""
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(torch.promote_types(q.dtype, k.dtype), "float32")
    tf32 = dtype == "float32" and torch.get_float32_matmul_precision() != "highest"
    return dtype, "tf32" if tf32 else "ieee"


def _padded(dim: int) -> int:
    """The next power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, 1 << max(dim - 1, 0).bit_length())


@functools.cache
def _kernels(interpret: bool):
    """The kernel module, compiled for the GPU or, for CPU tensors, loaded afresh in Triton's interpreter mode.

    The interpreted copy is a separate module object so that its jit functions (and the helpers they call) are
    interpreted ones while the package's own import stays compiled, whatever TRITON_INTERPRET says.
    """
    name = f"{__package__}._triton_kernels"
    if not interpret:
        return importlib.import_module(name)
    import triton.language  # noqa: F401  (Triton itself stays as TRITON_INTERPRET says; only our module flips)

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the module's functions are decorated
    try:
        source = Path(__file__).with_name("_triton_kernels.py")
        spec = importlib.util.spec_from_file_location(f"{name}_interpreted", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module
