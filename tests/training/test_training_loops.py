"""Training loops: a few steps learn, a resumed run equals an uninterrupted one, exports load into the engine."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from world_model import load_transformer
from world_model.config import preset
from world_model.engine import build_engine
from world_model.engine_api import ChunkRequest
from world_model.start_scenes import DEFAULT_SCENE, render_scene
from world_model.training import train_dit, train_vae, weights
from world_model.training.common import CHECKPOINT_NAME, LOG_NAME, ClipPool, LoopConfig, read_log, parameter_bytes, train
from world_model.transformer import SanaWMTransformer
from world_model.vae import VideoVAE

CPU = torch.device("cpu")
SMALL_CLIPS = ["--clips", "2", "--width", "64", "--height", "64", "--batch", "2", "--warmup", "1"]
PACKAGE_LIMIT_BYTES = 30_000_000


def _fit(model: torch.nn.Module, loss_fn, steps: int, lr: float, out: Path) -> tuple[float, float]:
    """Step 0's loss before and after ``steps`` steps (step 0's batch and noise are fixed by the seed)."""
    with torch.no_grad():
        before = loss_fn(0)[0].item()
    train(model, loss_fn, LoopConfig(steps=steps, lr=lr, warmup=1, minutes=5.0), out, resume=False)
    with torch.no_grad():
        after = loss_fn(0)[0].item()
    return before, after


def test_vae_steps_reduce_loss(tmp_path):
    pool = ClipPool.render([3], frames=9, width=64, height=64)
    vae = VideoVAE.from_preset("tiny")
    model = vae.model.requires_grad_(True)
    task = train_vae.VAETask(model, pool, train_vae.VAELossConfig(window=9, batch=1), seed=0, device=CPU)
    before, after = _fit(model, task.loss, steps=12, lr=3e-3, out=tmp_path)
    assert after < 0.8 * before, (before, after)


def test_dit_steps_reduce_loss(tmp_path):
    pool = ClipPool.render([3], frames=49, width=64, height=64)
    latents = train_dit.LatentPool.encode(VideoVAE.from_preset("tiny"), pool)
    assert latents.latents.shape == (1, 16, 7, 2, 2)
    model = train_dit.new_transformer(preset("tiny"), seed=0)
    task = train_dit.DiTTask(model, latents, train_dit.NoiseConfig(), batch=2, prompt="a scene", seed=0, device=CPU)
    before, after = _fit(model, task.loss, steps=12, lr=2e-3, out=tmp_path)
    assert after < 0.8 * before, (before, after)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor on the CPU needs a C++ compiler")
def test_a_compiled_loss_forward_gives_the_eager_loss_and_gradients():
    """``train_dit --compile``: the loss's forward through torch.compile (Inductor) gives the eager loss and
    gradients. Two blocks (a GDN and a softmax one) over the first chunk keep the compile to about a minute."""
    pool = ClipPool.render([3], frames=25, width=64, height=64)
    latents = train_dit.LatentPool.encode(VideoVAE.from_preset("tiny"), pool)
    config = preset("tiny", num_layers=2, softmax_every_n=2, chunk_plucker_post_attn_blocks=2)
    runs = []
    for compiled in (False, True):
        model = train_dit.new_transformer(config, seed=0)
        task = train_dit.DiTTask(model, latents, train_dit.NoiseConfig(), batch=2, prompt="a scene", seed=0, device=CPU,
                                 compile_forward=compiled)
        assert (task.forward is model) != compiled
        loss = task.loss(3)[0]
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager), (compiled_loss, compiled) = runs
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert compiled.keys() == eager.keys() and len(eager) > 10
    for name, grad in eager.items():  # against each tensor's largest value: near-zero entries differ by reassociation
        assert (compiled[name] - grad).abs().max() <= 1e-6 + 1e-4 * grad.abs().max(), name


def test_chunk_timesteps_anchor_clean_and_chunks_constant():
    chunks = ((0, 4), (4, 7), (7, 10))
    t = train_dit.chunk_timesteps(torch.Generator().manual_seed(0), 256, chunks, train_dit.NoiseConfig())
    assert (t[:, 0] == 0).all() and ((t >= 0) & (t <= 1000)).all()
    for start, end in ((1, 4), *chunks[1:]):
        assert (t[:, start:end] == t[:, start : start + 1]).all()
    assert (t[:, -1] > 0).all()  # the last chunk is always noisy
    teacher = (t[:, 1:7] == 0).all(1)
    assert 0.3 < teacher.float().mean() < 0.7  # p_clean_history = 0.5
    on_schedule = torch.isin(t[:, -1], torch.tensor([1000.0, 960.0, 889.0, 727.0]))
    assert on_schedule.float().mean() > 0.6  # p_schedule = 0.75, plus uniform draws that land on them


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    train_vae.main([*SMALL_CLIPS, "--frames", "9", "--window", "9", "--preset", "tiny", "--steps", "1", "--out", str(root / "run"), "--export", str(root / "vae")])
    return root / "vae"


def _dit_args(vae: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL_CLIPS, "--frames", "49", "--model", "tiny", "--vae", str(vae), "--steps", "4", "--out", str(out), *extra]


def _vae_args(_vae: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL_CLIPS, "--frames", "17", "--window", "9", "--preset", "tiny", "--steps", "4", "--out", str(out), *extra]


def _rollout_args(vae: Path, out: Path, *extra: str) -> list[str]:
    return _dit_args(vae, out, "--rollout-chunks", "1", "--p-rollout", "0.5", *extra)  # 49 frames: 7 latents, room for 1


@pytest.mark.parametrize("script, args", [(train_vae, _vae_args), (train_dit, _dit_args), (train_dit, _rollout_args)], ids=["vae", "dit", "rollout"])
def test_resume_is_bit_identical(tmp_path, tiny_vae_folder, script, args):
    script.main(args(tiny_vae_folder, tmp_path / "whole"))
    script.main(args(tiny_vae_folder, tmp_path / "slots", "--stop-at", "2"))
    assert torch.load(tmp_path / "slots" / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    script.main(args(tiny_vae_folder, tmp_path / "slots", "--resume"))
    whole = torch.load(tmp_path / "whole" / CHECKPOINT_NAME, weights_only=True)
    slots = torch.load(tmp_path / "slots" / CHECKPOINT_NAME, weights_only=True)
    assert whole["step"] == slots["step"] == 4
    for name, value in whole["model"].items():
        assert torch.equal(value, slots["model"][name]), name
    untimed = lambda path: [{k: v for k, v in row.items() if k != "seconds"} for row in read_log(path)]  # wall clock differs
    assert untimed(tmp_path / "whole" / LOG_NAME) == untimed(tmp_path / "slots" / LOG_NAME)


def test_decoder_only_fine_tune_keeps_the_encoder_and_its_latent_space(tmp_path, tiny_vae_folder):
    """``--init VAE --decoder-only``: the decoder learns (here with the frame-to-frame term too), while the encoder
    and the latent statistics stay bit for bit, so a DiT trained on that VAE's latents sees the same latents."""
    out = tmp_path / "vae"
    train_vae.main([*SMALL_CLIPS, "--frames", "17", "--window", "9", "--init", str(tiny_vae_folder), "--decoder-only",
                    "--temporal-weight", "1.0", "--steps", "3", "--lr", "1e-3", "--out", str(tmp_path / "run"), "--export", str(out)])
    before, after = load_file(str(tiny_vae_folder / train_vae.WEIGHTS_NAME)), load_file(str(out / train_vae.WEIGHTS_NAME))
    assert before.keys() == after.keys()
    kept = [k for k in before if not k.startswith("decoder.")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)  # encoder, latents_mean, latents_std
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert "temporal" in next(iter(read_log(tmp_path / "run" / LOG_NAME)))
    with pytest.raises(SystemExit, match="needs --init"):
        train_vae.main([*SMALL_CLIPS, "--decoder-only", "--steps", "1", "--out", str(tmp_path / "bad")])


def test_temporal_term_is_zero_for_a_copy_and_sees_a_frozen_clip():
    video = torch.randn(1, 3, 9, 8, 8)
    assert train_vae.difference_l1(video, video, dim=2) == 0
    frozen = video[:, :, :1].expand_as(video)  # right on average in every frame, but without the motion
    assert train_vae.difference_l1(frozen, video, dim=2) > 0.5


def test_demo_export_round_trip(tmp_path):
    """The training default (the demo DiT over the wide demo VAE) exports a folder the engine runs, also split
    into the shards a device call hands back."""
    train_vae.main(["--clips", "1", "--frames", "9", "--window", "9", "--batch", "1", "--steps", "1", "--out", str(tmp_path / "vae_run"), "--export", str(tmp_path / "vae")])
    package = tmp_path / "demo"
    train_dit.main(["--clips", "1", "--frames", "17", "--batch", "1", "--steps", "1", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "dit_run"), "--export", str(package)])

    vae = VideoVAE.from_pretrained(package / "vae", dtype=torch.float32)
    stored = load_file(str(package / "vae" / train_vae.WEIGHTS_NAME))
    assert stored["latents_std"].dtype == torch.bfloat16 and vae.latent_channels == 64  # the demo-wide preset
    dit = load_transformer(package / "transformer")
    assert dataclasses.replace(dit.config, camera_math="nvlabs") == preset("demo", in_channels=64)  # follows the VAE

    sharded = tmp_path / "sharded"
    files = weights.rewrite_folder(package, sharded, max_bytes=15_000_000)
    assert len(files) == 3 and max(f.stat().st_size for f in files) <= 15_000_000  # DiT in 2 shards, VAE in 1
    engine = build_engine(model="demo", checkpoint=str(sharded))
    assert (engine.info.width, engine.info.height) == (256, 160)
    assert np.array_equal(engine.default_image(), render_scene(DEFAULT_SCENE, 256, 160))  # a renderer-world model
    session = engine.open_session(prompt=train_dit.DEMO_PROMPT)
    poses = np.repeat(np.eye(4)[None], engine.info.chunk_pixel_frames, axis=0)
    (result,) = engine.step([ChunkRequest(session, poses)])
    assert result.frames.shape[1:] == (160, 256, 3) and result.frames.dtype == np.uint8
    key = "blocks.0.attn.beta_proj.weight"
    assert torch.equal(engine.model.state_dict()[key], load_file(str(package / "transformer" / train_dit.WEIGHTS_NAME))[key].float())


def test_demo_preset_builds_and_fits_the_package_limit():
    engine = build_engine(model="demo")
    assert (engine.info.width, engine.info.height) == (256, 160)
    with torch.device("meta"):
        dit = SanaWMTransformer(preset("demo"))
    vae = VideoVAE.from_preset("demo", device="meta").model
    dit_params, vae_params = (sum(p.numel() for p in m.parameters()) for m in (dit, vae))
    print(f"demo DiT {dit_params:,} parameters, VAE {vae_params:,}; package {(parameter_bytes(dit) + parameter_bytes(vae)) / 1e6:.1f} MB bf16")
    assert parameter_bytes(dit) + parameter_bytes(vae) <= PACKAGE_LIMIT_BYTES
