"""The built-in default model: the trained ``demo`` weights shipped in ``world_model/demo/``, the explicit
``random_weights`` switch, the renderer start scene, and clear errors when the weights are gone."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from world_model.engine import SHIPPED_WEIGHTS, build_engine, default_image
from world_model.engine_api import ChunkRequest, EngineError
from world_model.start_scenes import DEFAULT_SCENE, DEMO_PROMPT, START_SCENES, find_scene, render_scene

DEMO = SHIPPED_WEIGHTS["demo"]
WEIGHTS = "diffusion_pytorch_model.safetensors"
DIT_KEY, VAE_KEY = "blocks.0.attn.beta_proj.weight", "decoder.conv_in.conv.weight"


@pytest.fixture(scope="module")
def demo():
    return build_engine()  # the default: demo, shipped weights


def test_the_default_engine_is_the_demo_model_with_the_shipped_weights(demo):
    assert (demo.info.model, demo.info.width, demo.info.height) == ("demo", 256, 160)
    dit, vae = load_file(str(DEMO / "transformer" / WEIGHTS)), load_file(str(DEMO / "vae" / WEIGHTS))
    assert torch.equal(demo.model.state_dict()[DIT_KEY], dit[DIT_KEY].float())  # bf16 on disk, fp32 in the engine
    assert torch.equal(demo.vae.model.state_dict()[VAE_KEY], vae[VAE_KEY].float())


def test_random_weights_are_random_and_only_for_presets(demo):
    random = build_engine("demo", random_weights=True)
    assert random.info == demo.info
    assert not torch.equal(random.model.state_dict()[DIT_KEY], demo.model.state_dict()[DIT_KEY])
    assert not torch.equal(random.vae.model.state_dict()[VAE_KEY], demo.vae.model.state_dict()[VAE_KEY])
    with pytest.raises(EngineError, match="exclude each other"):
        build_engine("demo", checkpoint=str(DEMO), random_weights=True)


def test_the_trained_model_continues_its_start_scene_and_random_weights_do_not():
    """One short chunk from the default start scene, standing still: the trained model stays near the
    start image (blurred), random weights give noise. Better-trained weights only lower the first number."""
    errors = {}
    for random in (False, True):
        engine = build_engine("demo", chunk_frames=1, random_weights=random)
        start = engine.default_image().astype(np.float32)
        sid = engine.open_session(prompt=DEMO_PROMPT)
        (result,) = engine.step([ChunkRequest(sid, np.repeat(np.eye(4)[None], engine.info.chunk_pixel_frames, axis=0))])
        errors[random] = float(np.abs(result.frames.astype(np.float32) - start).mean())
    assert errors[False] < 25 < 40 < errors[True], errors


def test_start_images_the_demo_renderer_scene_other_models_the_plain_one(demo):
    assert np.array_equal(demo.default_image(), render_scene(DEFAULT_SCENE, 256, 160))
    assert DEFAULT_SCENE.seed >= 1_000_000 and all(s.seed >= 1_000_000 for s in START_SCENES)  # held out of training
    assert len({s.id for s in START_SCENES}) == len(START_SCENES) >= 3 and find_scene("nope") is None
    from world_model.training.train_dit import DEMO_PROMPT as TRAINED_PROMPT

    assert DEMO_PROMPT == TRAINED_PROMPT  # the scenes suggest the prompt the model was trained with
    tiny = build_engine("tiny")
    assert np.array_equal(tiny.default_image(), default_image(256, 128))


def test_missing_shipped_weights_are_a_clear_error(tmp_path, monkeypatch):
    stripped = tmp_path / "demo"
    shutil.copytree(DEMO, stripped)
    (stripped / "vae" / WEIGHTS).unlink()
    monkeypatch.setitem(SHIPPED_WEIGHTS, "demo", stripped)
    with pytest.raises(EngineError, match=r"weights are missing from .*demo.*vae/diffusion_pytorch_model\.safetensors.*random_weights=True"):
        build_engine("demo")
    assert build_engine("demo", random_weights=True).info.model == "demo"  # random weights need no files


def test_the_shipped_weights_are_package_data():
    """A normal (non-editable) install must carry the weights: pyproject's package-data names every file."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from world_model.engine import _SHIPPED_FILES

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["world_model"]
    assert DEMO.parent.name == "world_model"
    for name in _SHIPPED_FILES:
        assert any(fnmatch.fnmatch(f"demo/{name}", g) for g in globs), name
