"""The next demo recipe (issue 9) on CPU: the wide demo VAE."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import rel_err
from world_model.training import train_vae
from world_model.training.common import ClipPool, LoopConfig, read_log, train
from world_model.vae import VideoVAE, vae_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second thread only adds synchronisation, which on a busy 2-core machine made
    the DiT's streaming forwards up to 100x slower (measured: 15 ms on one thread, 1-2 s on two)."""
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
