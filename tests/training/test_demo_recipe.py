"""The next demo recipe (issue 9) on CPU: the wide demo VAE, the rollout phase, DiT trunks reused over a new
latent width, and export sizes that fit a lent device call."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import rel_err
from world_model.config import preset
from world_model.sampler import SamplerConfig, stream_latents
from world_model.text import HashTextEncoder
from world_model.training import train_dit, train_vae
from world_model.training.common import ClipPool, LoopConfig, read_log, train
from world_model.vae import VideoVAE, vae_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second thread only adds synchronisation, which on a busy 2-core machine made
    the streaming forwards up to 100x slower (measured: 15 ms on one thread, 1-2 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the wide VAE ------------------------------------------------------------------------------------------


def test_demo_wide_vae_keeps_the_compression_and_streams_like_one_shot():
    wide, demo = vae_config("demo-wide"), vae_config("demo")
    assert wide["latent_channels"] == 4 * demo["latent_channels"] == 64
    vae = VideoVAE.from_preset("demo-wide", seed=1)
    assert (vae.spatial_ratio, vae.temporal_ratio) == (32, 8)  # the same DiT tokens as the demo VAE
    latents = torch.randn(1, 64, 7, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = vae.decode(latents)
    assert expected.shape == (1, 3, 49, 64, 96)
    cache = vae.new_decoder_cache()
    streamed = torch.cat([vae.decode_chunk(latents[:, :, :4], cache), vae.decode_chunk(latents[:, :, 4:], cache)], dim=2)
    assert rel_err(streamed, expected) < 1e-5


def test_demo_wide_vae_trains(tmp_path):
    pool = ClipPool.render([3], frames=9, width=64, height=64)
    vae = VideoVAE.from_preset("demo-wide")
    model = vae.model.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = train_vae.VAETask(model, pool, train_vae.VAELossConfig(window=9, batch=1), seed=0, device=CPU)
    train(model, task.loss, LoopConfig(steps=3, lr=1e-3, warmup=1, minutes=5.0), tmp_path, resume=False)
    rows = list(read_log(tmp_path / "log.csv"))
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert not torch.equal(before["decoder.conv_out.conv.weight"], model.state_dict()["decoder.conv_out.conv.weight"])
    assert not torch.equal(before["encoder.conv_out.conv.weight"], model.state_dict()["encoder.conv_out.conv.weight"])


# ---- the rollout phase -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_latents() -> train_dit.LatentPool:
    """Two 97-frame clips (13 latents: a first chunk and three more) through the tiny VAE."""
    pool = ClipPool.render([3, 4], frames=97, width=64, height=64)
    return train_dit.LatentPool.encode(VideoVAE.from_preset("tiny"), pool)


def test_roll_out_is_the_engines_sampler(long_latents):
    """The generated history is what the sampler of the streaming engine makes from the same noise."""
    model = train_dit.new_transformer(preset("tiny"), seed=0)
    text = HashTextEncoder(24).encode(["a scene"] * 2)
    x0, c2w = long_latents.latents[:, :, :7], long_latents.poses
    intrinsics = long_latents.intrinsics.expand(*c2w.shape[:2], 4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    sampler = SamplerConfig()
    with torch.no_grad():
        ours = train_dit.roll_out(model, x0[:, :, 0], noise, text, c2w, intrinsics, sampler)
        engine = stream_latents(model, model.new_state(), noise, x0[:, :, 0], *text, c2w, intrinsics, sampler)
    assert torch.equal(ours, engine)
    assert torch.equal(ours[:, :, 0], x0[:, :, 0])  # the anchor is kept


def test_rollout_steps_train_on_generated_history(tmp_path, long_latents):
    model = train_dit.new_transformer(preset("tiny"), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rollout = train_dit.RolloutConfig(chunks=3, p_rollout=0.5)
    task = train_dit.RolloutTask(model, long_latents, train_dit.NoiseConfig(), rollout, batch=4, prompt="a scene", seed=0, device=CPU)
    train(model, task.loss, LoopConfig(steps=4, lr=1e-3, warmup=1, minutes=5.0), tmp_path, resume=False)
    rows = list(read_log(tmp_path / "log.csv"))
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert all(1 <= r["rollout_chunks"] <= 3 for r in rows) and any(r["rolled"] > 0 for r in rows)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "x_embedder.proj.weight" in changed and "blocks.0.attn.beta_proj.weight" in changed


def test_rollout_history_replaces_the_ground_truth_and_is_clean(long_latents, monkeypatch):
    """What the loss sees: the rolled samples' first n chunks are generated and at t = 0, the next chunk is the
    ground truth and noisy; the other samples are the usual ones."""
    model = train_dit.new_transformer(preset("tiny"), seed=0)
    seen = {}

    def loss(model, x0, t, noise, text, c2w, intrinsics):
        seen.update(x0=x0, t=t)
        return x0.sum() * 0.0

    monkeypatch.setattr(train_dit, "flow_matching_loss", loss)
    task = train_dit.RolloutTask(model, long_latents, train_dit.NoiseConfig(), train_dit.RolloutConfig(chunks=3, p_rollout=0.5),
                                 batch=8, prompt="a scene", seed=0, device=CPU)
    generator = train_dit.step_generator(0, 0)
    clips = torch.randint(2, (8,), generator=generator)
    n = int(torch.randint(1, 4, (1,), generator=generator))
    _, metrics = task.loss(0)
    history, frames = 4 + 3 * (n - 1), 4 + 3 * n
    x0, t = seen["x0"], seen["t"]
    truth = long_latents.latents[clips, :, :frames]
    assert x0.shape == truth.shape and metrics["rollout_chunks"] == n
    rolled = (t[:, :history] == 0).all(1) & ~torch.isclose(x0[:, :, 1:history], truth[:, :, 1:history]).all(dim=(1, 2, 3, 4))
    assert 0 < rolled.sum() < 8 and rolled.float().mean() == metrics["rolled"]
    assert torch.equal(x0[:, :, history:], truth[:, :, history:]) and (t[:, history:] > 0).all()
    assert torch.equal(x0[~rolled], truth[~rolled])


def test_rollout_refuses_clips_too_short_for_its_chunks(long_latents):
    model = train_dit.new_transformer(preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="clips of 13 latents hold 1..3 generated chunks.*not 4.*121-frame clips"):
        train_dit.RolloutTask(model, long_latents, train_dit.NoiseConfig(), train_dit.RolloutConfig(chunks=4), 2, "a", 0, CPU)


# ---- a trunk over a new latent width, sizes ---------------------------------------------------------------


def test_init_from_another_latent_width_keeps_the_trunk(tmp_path):
    (tmp_path / "vae").mkdir()
    narrow = train_dit.new_transformer(preset("tiny"), seed=1)
    train_dit.export_dit(narrow, tmp_path / "vae", tmp_path / "export")
    wide = train_dit.new_transformer(preset("tiny", in_channels=64), seed=0)
    fresh = {k: v.clone() for k, v in wide.state_dict().items()}
    train_dit.load_exported(wide, tmp_path / "export")
    for key, value in wide.state_dict().items():
        expected = fresh[key] if key in train_dit.LATENT_LAYERS else narrow.state_dict()[key].to(torch.bfloat16).float()
        assert torch.equal(value, expected), key
    other = train_dit.new_transformer(preset("tiny", hidden_size=48, linear_head_dim=48, num_attention_heads=1), seed=0)
    with pytest.raises(SystemExit, match="beyond the latent-channel layers"):
        train_dit.load_exported(other, tmp_path / "export")


def test_export_sizes_fit_a_device_call():
    """Files of at most 16 MiB and 64 MiB in all come back from a call: the wide VAE fits in one bf16 file,
    the DiT needs two shards (docs/demo-training/README.md, "Next run")."""
    with torch.device("meta"):
        dit = train_dit.SanaWMTransformer(preset("demo", in_channels=64))
    vae = VideoVAE.from_preset("demo-wide", device="meta").model
    dit_bytes, vae_bytes = (2 * sum(t.numel() for t in m.state_dict().values()) for m in (dit, vae))
    assert vae_bytes < 15_000_000 < dit_bytes < 2 * 15_000_000
    assert 2 * dit_bytes + vae_bytes < 64 * 2**20
