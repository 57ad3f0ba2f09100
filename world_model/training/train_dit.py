"""Train the Stage-1 DiT by flow matching on the trained VAE's latents, conditioned on the clips' cameras.

The model runs in the ``streaming`` one-shot mode, which is what the cached chunk-by-chunk inference path
computes, so training and inference see the same attention pattern. Noise is per chunk (diffusion
forcing): latent frame 0, the image anchor, is always clean at t = 0; every later chunk (chunk 0's other
frames included) draws its own timestep, mostly one of the sampler's four (1000, 960, 889, 727) so a 4-step
sampler works, otherwise uniform in 1..1000; with probability ``p_clean_history`` all chunks before the
last are clean (teacher forcing: at inference the history is always clean). The loss is the MSE of the
velocity ``v = eps - x0`` over the noisy frames only. The scenes carry no text, so every clip gets the
same short prompt through the hash text encoder the demo engine uses.

Latents are encoded once (``OUT/latents.pt``) and reused by resumed runs. On a GPU::

    python -m world_model.training.train_dit --data shards/ --vae runs/demo/vae --out runs/dit --device cuda --minutes 28
    python -m world_model.training.train_dit --data shards/ --vae runs/demo/vae --out runs/dit --device cuda --minutes 28 --resume --export runs/demo

``--export DIR`` writes ``DIR/transformer/`` (``config.json`` + bf16 safetensors) and copies the VAE to
``DIR/vae/``: ``build_engine(model="demo", checkpoint=DIR)`` runs it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from world_model.config import TransformerConfig, preset
from world_model.schedule import STREAMING_TIMESTEPS
from world_model.start_scenes import DEMO_PROMPT
from world_model.text import HashTextEncoder
from world_model.training.common import (
    ClipPool,
    add_common_arguments,
    autocast,
    encode_clips,
    load_clips,
    loop_config,
    parameter_bytes,
    step_generator,
    train,
)
from world_model.transformer import SanaWMTransformer, chunk_bounds
from world_model.vae import VideoVAE

log = logging.getLogger(__name__)

LATENTS_NAME = "latents.pt"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class NoiseConfig:
    timesteps: tuple[int, ...] = STREAMING_TIMESTEPS  # the sampler's timesteps, drawn with p_schedule
    p_schedule: float = 0.75  # chance a chunk's timestep is one of ``timesteps`` (else uniform in 1..1000)
    p_clean_history: float = 0.5  # chance that every chunk before the last is clean (teacher forcing)


def chunk_timesteps(generator: torch.Generator, batch: int, chunks: Sequence[tuple[int, int]], config: NoiseConfig) -> torch.Tensor:
    """Integer timesteps ``(B, T)`` in 0..1000, constant within each chunk; frame 0 (the anchor) is 0.

    Every draw is made whatever its outcome, so the generator advances the same way for any batch.
    """
    frames = chunks[-1][1]
    t = torch.zeros(batch, frames)
    table = torch.tensor(config.timesteps, dtype=torch.float32)
    for start, end in chunks:
        scheduled = table[torch.randint(len(table), (batch,), generator=generator)]
        uniform = torch.randint(1, 1001, (batch,), generator=generator).float()
        pick = torch.rand(batch, generator=generator) < config.p_schedule
        t[:, start:end] = torch.where(pick, scheduled, uniform)[:, None]
    clean_history = torch.rand(batch, generator=generator) < config.p_clean_history
    t[clean_history, : chunks[-1][0]] = 0.0
    t[:, 0] = 0.0
    return t


@dataclass(frozen=True)
class LatentPool:
    """The training clips as normalised latents with their cameras."""

    latents: torch.Tensor  # (N, C, T, h, w) float32, normalised (model space)
    poses: torch.Tensor  # (N, F, 4, 4) float32 camera-to-world per pixel frame, frame 0 the identity
    intrinsics: torch.Tensor  # (4,) float32 fx, fy, cx, cy in pixels of the decoded video

    @classmethod
    def encode(cls, vae: VideoVAE, pool: ClipPool) -> LatentPool:
        """Encode whole clips (posterior mode), normalised as ``VideoVAE.encode_image`` does."""
        latents = encode_clips(vae, pool, normalised=True)
        return cls(latents, torch.from_numpy(pool.poses), torch.from_numpy(pool.intrinsics))

    def save(self, path: Path) -> None:
        torch.save({"latents": self.latents, "poses": self.poses, "intrinsics": self.intrinsics}, path)

    @classmethod
    def load(cls, path: Path) -> LatentPool:
        """A pool written by :meth:`save` (latents may be stored as float16 to carry them between machines)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["latents"].float(), data["poses"].float(), data["intrinsics"].float())


def flow_matching_loss(
    model: SanaWMTransformer,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    c2w: torch.Tensor,
    intrinsics: torch.Tensor,
) -> torch.Tensor:
    """MSE of the predicted velocity on the noisy frames (``t > 0``) of ``x0`` ``(B, C, T, h, w)`` at timesteps ``t`` ``(B, T)``."""
    sigma = (t / 1000.0).to(x0.device)[:, None, :, None, None]
    x = (1.0 - sigma) * x0 + sigma * noise  # rectified flow (schedule.py)
    with autocast(x0.device):
        velocity = model(x, t.to(x0.device), *text, c2w, intrinsics, mode="streaming")
    per_frame = (velocity.float() - (noise - x0)).square().mean(dim=(1, 3, 4))  # (B, T)
    return per_frame[t.to(x0.device) > 0].mean()


class DiTTask:
    """Step ``s``'s loss: clips, timesteps and noise all drawn from ``step_generator(seed, s)``."""

    def __init__(self, model: SanaWMTransformer, pool: LatentPool, noise: NoiseConfig, batch: int, prompt: str, seed: int, device: torch.device) -> None:
        config = model.config
        frames = pool.latents.shape[2]
        self.model, self.pool, self.noise, self.batch_size, self.seed, self.device = model, pool, noise, batch, seed, device
        self.chunks = chunk_bounds(frames, config.first_chunk_frames, config.chunk_frames)
        text, mask = HashTextEncoder(config.caption_channels).encode([prompt])
        self.text = (text.expand(batch, -1, -1).to(device), mask.expand(batch, -1).to(device))

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        generator = step_generator(self.seed, step)
        clips = torch.randint(len(self.pool.latents), (self.batch_size,), generator=generator)
        t = chunk_timesteps(generator, self.batch_size, self.chunks, self.noise)
        x0 = self.pool.latents[clips]
        noise = torch.randn(x0.shape, generator=generator)
        c2w = self.pool.poses[clips].to(self.device)
        intrinsics = self.pool.intrinsics.expand(*c2w.shape[:2], 4).to(self.device)
        loss = flow_matching_loss(self.model, x0.to(self.device), t, noise.to(self.device), self.text, c2w, intrinsics)
        return loss, {"noisy_frames": float((t > 0).float().mean())}


def new_transformer(config: TransformerConfig, seed: int) -> SanaWMTransformer:
    """A freshly initialised DiT (the same weights for the same seed, drawn on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SanaWMTransformer(config)


def export_dit(model: SanaWMTransformer, vae_folder: Path, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``folder/transformer/`` (``config.json`` + weights in ``dtype``) and copy the VAE to ``folder/vae/``."""
    folder = Path(folder)
    dit = folder / "transformer"
    dit.mkdir(parents=True, exist_ok=True)
    model.config.save(dit / "config.json")
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}, str(dit / WEIGHTS_NAME))
    if (folder / "vae").resolve() != Path(vae_folder).resolve():
        shutil.copytree(vae_folder, folder / "vae", dirs_exist_ok=True)
    return folder


def load_exported(model: SanaWMTransformer, folder: Path) -> None:
    """Load ``folder/transformer/`` weights (written by :func:`export_dit`) into ``model`` in its own dtype, strictly."""
    path = folder / "transformer" / WEIGHTS_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: no exported DiT weights")
    model.load_state_dict(load_file(str(path)), strict=True)
    log.info("started from %s", path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_lr=3e-4)
    parser.add_argument("--vae", required=True, help="the trained VAE folder (train_vae --export)")
    parser.add_argument("--model", default="demo", help="DiT preset (world_model.config.PRESETS)")
    parser.add_argument("--init", help="start from the weights of an exported folder (--export) with a fresh optimizer")
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--p-schedule", type=float, default=NoiseConfig.p_schedule)
    parser.add_argument("--p-clean-history", type=float, default=NoiseConfig.p_clean_history)
    return parser.parse_args(argv)


def latent_pool(args: argparse.Namespace, out: Path, device: torch.device) -> LatentPool:
    """The cached latents of the run, or the clips encoded now (and cached) by the VAE of ``--vae``."""
    cache = out / LATENTS_NAME
    if cache.is_file():
        return LatentPool.load(cache)
    vae = VideoVAE.from_pretrained(args.vae, dtype=torch.float32, device=device)
    pool = LatentPool.encode(vae, load_clips(args.data, args.clips, args.frames, args.width, args.height, args.workers))
    out.mkdir(parents=True, exist_ok=True)
    pool.save(cache)
    return pool


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    out = Path(args.out)
    pool = latent_pool(args, out, device)
    model = new_transformer(preset(args.model), args.seed)
    if args.init:
        if args.resume:
            raise SystemExit("--init and --resume exclude each other")
        load_exported(model, Path(args.init))
    model = model.to(device)
    count = sum(p.numel() for p in model.parameters())
    log.info("DiT %s: %d parameters (%.1f MB in bf16); latents %s", args.model, count, parameter_bytes(model) / 1e6, tuple(pool.latents.shape))
    noise = NoiseConfig(p_schedule=args.p_schedule, p_clean_history=args.p_clean_history)
    task = DiTTask(model, pool, noise, args.batch, args.prompt, args.seed, device)
    train(model, task.loss, loop_config(args), out, resume=args.resume, stop_at=args.stop_at)
    if args.export:
        log.info("exported to %s", export_dit(model, Path(args.vae), args.export))


if __name__ == "__main__":
    main()
