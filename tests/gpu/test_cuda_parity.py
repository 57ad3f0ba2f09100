"""The GPU path against the CPU reference (runs on a CUDA machine; skipped elsewhere).

    python -m pytest -q tests/gpu

Tolerances: fp32 on the GPU with TF32 matmuls (the engine's CUDA default for the GDN state updates, 10-bit
mantissa like the bf16 dots of NVlabs' kernels) lands within 1e-2 relative of the CPU fp32 reference;
with TF32 off for matmuls and cuDNN convolutions, 1e-4. Compiled blocks (Inductor) equal eager within 1e-3.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from tests.conftest import rel_err
from tests.engine.test_streaming_state import _tiny
from world_model.sampler import SamplerConfig, chunk_spans
from world_model.transformer import SanaWMTransformer
from world_model.vae import VideoVAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HW = (4, 8)
FRAMES = 10


def _model() -> SanaWMTransformer:
    return _tiny(softmax_bf16=False)


def _inputs(device):
    gen = torch.Generator().manual_seed(1)
    pixel = 8 * (FRAMES - 1) + 1
    c2w = torch.eye(4).repeat(2, pixel, 1, 1)
    c2w[..., 2, 3] = torch.cumsum(torch.rand(2, pixel, generator=gen) * 0.05, dim=1)
    intr = torch.tensor([200.0, 200.0, 128.0, 64.0]).repeat(2, pixel, 1)
    text = torch.randn(2, 6, 24, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    clean = torch.randn(2, 16, FRAMES, *HW, generator=gen)
    return [t.to(device) for t in (c2w, intr, text, mask, clean)]


def _stream(model, device):
    """Velocities of a denoising call per chunk and the final state, clean history written at t = 0."""
    c2w, intr, text, mask, clean = _inputs(device)
    state = model.new_state(2)
    out = []
    with torch.no_grad():
        for start, end in chunk_spans(FRAMES, SamplerConfig()):
            x, t = clean[:, :, start:end], torch.full((2, end - start), 889.0, device=device)
            out.append(model(x, t, text, mask, c2w, intr, mode="streaming", state=state, start_frame=start))
            model(x, torch.zeros_like(t), text, mask, c2w, intr, mode="streaming", state=state, start_frame=start, write_state=True)
    return torch.cat(out, dim=2).cpu(), {k: v.float().cpu() for k, v in state.tensors().items()}


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 on or off for both matmuls and cuDNN convolutions (cuDNN's default is on)."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.fixture(scope="module")
def reference():
    return _stream(_model(), "cpu")


@pytest.mark.parametrize("tf32, tol", [(False, 1e-4), (True, 1e-2)])
def test_cuda_streaming_matches_the_cpu_reference(reference, tf32, tol):
    with _tf32(tf32):
        velocity, state = _stream(_model().cuda(), "cuda")
    assert rel_err(velocity, reference[0]) < tol
    for name, value in reference[1].items():
        assert rel_err(state[name], value) < tol, name


def test_compiled_blocks_match_eager():
    eager = _model().cuda()
    compiled = copy.deepcopy(eager)
    for block in compiled.blocks:
        block.compile()
    with _tf32(False):
        a, sa = _stream(eager, "cuda")
        b, sb = _stream(compiled, "cuda")
    assert rel_err(b, a) < 1e-3
    for name in sa:
        assert rel_err(sb[name], sa[name]) < 1e-3, name


def test_cuda_streaming_vae_decode_matches_the_cpu_reference():
    cpu = VideoVAE.from_preset("tiny", seed=3)
    gpu = VideoVAE.from_preset("tiny", seed=3, device="cuda")
    latents = torch.randn(1, 16, 7, *HW, generator=torch.Generator().manual_seed(2))
    outs = []
    for vae, device in ((cpu, "cpu"), (gpu, "cuda")):
        cache = vae.new_decoder_cache()
        with torch.no_grad(), _tf32(False):
            outs.append(torch.cat([vae.decode_chunk(latents[:, :, s:e].to(device), cache).cpu() for s, e in ((0, 4), (4, 7))], dim=2))
    assert rel_err(outs[1], outs[0]) < 1e-4
