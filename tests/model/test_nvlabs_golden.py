"""Parity with NVlabs' own streaming and chunk-causal code on its golden tiny run (sana-wm.md L)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import GOLDEN, rel_err
from world_model import load_transformer
from world_model.camera import CameraInputs, camera_inputs

TOL = 1e-3  # the bound; we reach ~2e-5 (softmax Q/K/V go through bf16 as in NVlabs)
LATENT_HW = (2, 3)
FRAMES = 10


@pytest.fixture(scope="module")
def golden():
    model = load_transformer(GOLDEN / "model.safetensors")  # NVlabs naming, config inferred from shapes
    inputs = load_file(str(GOLDEN / "inputs.safetensors"))
    return model, inputs, load_file(str(GOLDEN / "stream.safetensors")), load_file(str(GOLDEN / "oneshot.safetensors"))


def _text(inputs):
    return inputs["cond"][:, 0], inputs["cond_mask"].bool()


def test_camera_builder_reproduces_nvlabs_camera_tensors(golden):
    _, inputs, _, _ = golden
    cam = camera_inputs(inputs["c2w"][None], inputs["intrinsics_crop"][None], FRAMES, LATENT_HW)
    assert rel_err(cam.raymap, inputs["raymap"]) < 1e-6
    assert rel_err(cam.plucker, inputs["chunk_plucker"]) < 1e-6


@pytest.mark.parametrize("name", ["all_clean", "mixed0", "mixed1", "mixed2", "mixed3"])
def test_chunk_causal_reproduces_the_teacher(golden, name):
    model, inputs, _, oneshot = golden
    text, mask = _text(inputs)
    pixel_hw = (64, 96)
    # Through the public forward: raw poses and intrinsics of the 64x96 crop.
    with torch.no_grad():
        v = model(oneshot[f"{name}_x"], oneshot[f"{name}_t"][:, 0], text, mask, inputs["c2w"][None], inputs["intrinsics_crop"][None], mode="chunk_causal")
    assert pixel_hw == (32 * LATENT_HW[0], 32 * LATENT_HW[1])
    assert rel_err(v, oneshot[f"{name}_v"]) < TOL


@pytest.mark.parametrize("step", range(4))
def test_streaming_oneshot_reproduces_chunk2_denoising_calls(golden, step):
    model, inputs, stream, _ = golden
    text, mask = _text(inputs)
    call = 10 + step
    x = stream["final"].clone()  # chunks 0-1 clean at t = 0 ...
    x[:, :, 7:] = stream[f"call{call:02d}.x"]  # ... chunk 2 at its denoising input
    t = torch.zeros(1, FRAMES)
    t[:, 7:] = stream[f"call{call:02d}.t"].reshape(-1)
    cam = CameraInputs(inputs["raymap"], inputs["chunk_plucker"])
    with torch.no_grad():
        v, _ = model.run(x, t, text, mask, cam, model.layout("streaming", FRAMES, LATENT_HW))
    assert rel_err(v[:, :, 7:], stream[f"call{call:02d}.v"]) < TOL


def test_teacher_and_streaming_differ_as_section_L_says(golden):
    """The teacher's whole-sequence softmax differs from the streaming window (~0.6-0.9% relative)."""
    model, inputs, stream, oneshot = golden
    text, mask = _text(inputs)
    cam = CameraInputs(inputs["raymap"], inputs["chunk_plucker"])
    x, t = oneshot["mixed0_x"], oneshot["mixed0_t"][:, 0]
    with torch.no_grad():
        teacher, _ = model.run(x, t, text, mask, cam, model.layout("chunk_causal", FRAMES, LATENT_HW))
        streaming, _ = model.run(x, t, text, mask, cam, model.layout("streaming", FRAMES, LATENT_HW))
    assert 1e-3 < rel_err(streaming, teacher) < 5e-2
