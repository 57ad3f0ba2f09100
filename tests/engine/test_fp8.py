"""``--dtype fp8``: modelopt's FP8 block linears (simulated on the CPU; the FP8 GEMM runs on sm_89+ GPUs)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from world_model.controls import CameraRig
from world_model.engine import build_engine
from world_model.engine_api import ChunkRequest
from world_model.quantize import Fp8Linear, fp8_linears, quantize_fp8
from world_model.transformer import SanaWMTransformer

pytest.importorskip("modelopt.torch.quantization")


def _chunks(engine, count=2):
    sid, rig = engine.open_session(prompt="a harbour", seed=3), CameraRig()
    return [engine.step([ChunkRequest(sid, np.stack([rig.step(["w", "d"]) for _ in range(24)]))])[0] for _ in range(count)]


@pytest.fixture(scope="module")
def engines():
    return build_engine("tiny", dtype="bf16", random_weights=True), build_engine("tiny", dtype="fp8", random_weights=True)


def test_only_the_block_linears_wide_enough_for_fp8_tiles_are_chosen():
    model = build_engine("tiny", random_weights=True).model
    names = set(fp8_linears(model))
    block = model.blocks[0]
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.cross_attn.q_linear"} <= names
    assert block.attn.beta_proj.out_features % 16 != 0 and "blocks.0.attn.beta_proj" not in names
    assert not any(n.startswith(("t_block", "x_embedder", "y_embedder", "final_layer", "t_embedder")) for n in names)


def test_fp8_engine_holds_fp8_weights_for_exactly_those_linears(engines):
    bf16, fp8 = engines
    modules = dict(fp8.model.named_modules())
    chosen = set(fp8_linears(bf16.model))
    assert chosen and {n for n, m in modules.items() if isinstance(m, Fp8Linear)} == chosen
    for name in chosen:
        assert modules[name].weight.dtype == torch.float8_e4m3fn, name
        assert modules[name].input_scale > 0
    assert modules["blocks.0.attn.beta_proj"].weight.dtype == torch.bfloat16
    assert fp8.model.t_block[1].weight.dtype == torch.bfloat16
    assert fp8.info.dtype == "fp8"
    # the model keeps plain torch modules (no modelopt wrappers), so torch.compile can trace it
    assert not any(type(m).__module__.startswith("modelopt") for m in fp8.model.modules())


def test_fp8_linear_equals_simulated_quantisation():
    """The scaled FP8 GEMM equals the product of the dequantised FP8 operands (what modelopt simulates)."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = (torch.randn(2, 5, 64, generator=g) * 3).to(torch.bfloat16)
    w_amax, x_amax = linear.weight.abs().max().float(), torch.tensor(4.0)  # x beyond 4 saturates
    fp8 = Fp8Linear(linear, w_amax, x_amax)
    deq = lambda t, amax: (t.float() / (amax / 448)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (amax / 448)
    expected = deq(x, x_amax) @ deq(linear.weight, w_amax).t() + linear.bias.float()
    torch.testing.assert_close(fp8(x).float(), expected, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    assert fp8(x).shape == (2, 5, 32) and fp8(x).dtype == torch.bfloat16


def test_fp8_frames_stay_close_to_bf16(engines):
    bf16, fp8 = engines
    for a, b in zip(_chunks(bf16), _chunks(fp8)):
        diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
        assert diff.mean() < 4.0, diff.mean()  # measured 1.0-1.2 levels with random tiny weights
        assert not np.array_equal(a.frames, b.frames)  # the quantisation is really applied
        err = np.abs(a.latents - b.latents).max() / np.abs(a.latents).max()
        assert err < 0.1, err


def test_missing_modelopt_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    model = SanaWMTransformer(build_engine("tiny", random_weights=True).model.config)
    with pytest.raises(ImportError, match="pip install 'sana-wm-stream\\[fp8\\]'"):
        quantize_fp8(model, lambda m: None)


def test_fp8_linear_hands_the_gemm_a_row_major_input(monkeypatch):
    """cuBLASLt's FP8 GEMM refuses a column-major x: a transposed token view must reach it copied (seen on an H200)."""
    linear = torch.nn.Linear(32, 16).to(torch.bfloat16)
    fp8 = Fp8Linear(linear, linear.weight.abs().max().float(), torch.tensor(3.0))
    x = torch.randn(1, 32, 48).to(torch.bfloat16).transpose(1, 2)  # (1, 48, 32), a (1, C, N) tensor seen as tokens
    scaled_mm = torch._scaled_mm

    def checked(a, b, **kw):
        assert a.is_contiguous()
        return scaled_mm(a, b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    torch.testing.assert_close(fp8(x), fp8(x.contiguous()), rtol=0, atol=0)
