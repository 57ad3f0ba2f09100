"""Train the Stage-1 DiT by flow matching on the trained VAE's latents, conditioned on the clips' cameras.

The model runs in the ``streaming`` one-shot mode, which is what the cached chunk-by-chunk inference path
computes, so training and inference see the same attention pattern. Noise is per chunk (diffusion
forcing): latent frame 0, the image anchor, is always clean at t = 0; every later chunk (chunk 0's other
frames included) draws its own timestep, mostly one of the sampler's four (1000, 960, 889, 727) so a 4-step
sampler works, otherwise uniform in 1..1000; with probability ``p_clean_history`` all chunks before the
last are clean (teacher forcing: at inference the history is always clean). The loss is the MSE of the
velocity ``v = eps - x0`` over the noisy frames only. The scenes carry no text, so every clip gets the
same short prompt through the hash text encoder the demo engine uses.

Latents are encoded once (``--latents``, default ``OUT/latents.pt``) and reused by resumed runs and later phases. On a GPU::

    python -m world_model.training.train_dit --data shards/ --vae runs/demo/vae --out runs/dit --device cuda --minutes 28
    python -m world_model.training.train_dit --data shards/ --vae runs/demo/vae --out runs/dit --device cuda --minutes 28 --resume --export runs/demo

``--export DIR`` writes ``DIR/transformer/`` (``config.json`` + bf16 safetensors) and copies the VAE to
``DIR/vae/``: ``build_engine(model="demo", checkpoint=DIR)`` runs it. The DiT's latent channels (its patch
embedding and final layer) follow the VAE's; ``--init`` from a DiT of another latent width keeps everything
else of it (the trunk) and starts those two layers fresh.

**Rollout phase** (``--rollout-chunks N``, after the usual one, ``--init`` its export): the usual phase only
ever conditions on ground-truth history, but a live session conditions on its own output, and its errors
compound (the demo's picture dissolves after ~45 s). In each step a share ``--p-rollout`` of the batch gets
history the model made itself (:class:`RolloutTask`):

1. roll out, without gradient: from the clip's anchor latent and its cameras, the engine's sampler (the same
   four timesteps, chunk by chunk on the cached streaming path) generates the first ``n`` chunks, ``n`` drawn
   in 1..N per step;
2. those ``n`` chunks replace the clip's first latents, clean (t = 0); the chunk after them keeps its ground
   truth and gets its noise level as in the usual phase; later frames are cut off;
3. the same flow-matching loss on its noisy frames: denoise the next chunk towards the ground truth given
   the model's own history.

The rest of the batch are usual diffusion-forcing samples of the same length. ``n`` chunks need clips of
``first_chunk_frames + n * chunk_frames`` latents (N = 3: 13 latents, 97-frame clips).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file

from world_model.checkpoint import load_state_dict
from world_model.config import TransformerConfig, preset
from world_model.sampler import SamplerConfig, chunk_spans, denoise_chunk, write_chunk
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
    model: Callable[..., torch.Tensor],
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

    def __init__(
        self, model: SanaWMTransformer, pool: LatentPool, noise: NoiseConfig, batch: int, prompt: str, seed: int, device: torch.device,
        compile_forward: bool = False,
    ) -> None:
        config = model.config
        frames = pool.latents.shape[2]
        self.model, self.pool, self.noise, self.batch_size, self.seed, self.device = model, pool, noise, batch, seed, device
        # The loss's forward, through torch.compile on request (the same parameters): a step of the small DiT is
        # bound by launching its many small ops, not by arithmetic. Rollouts and exports use the plain model.
        self.forward = torch.compile(model) if compile_forward else model
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
        loss = flow_matching_loss(self.forward, x0.to(self.device), t, noise.to(self.device), self.text, c2w, intrinsics)
        return loss, {"noisy_frames": float((t > 0).float().mean())}


@dataclass(frozen=True)
class RolloutConfig:
    chunks: int = 3  # most chunks the model generates before the trained one (n is drawn in 1..chunks per step)
    p_rollout: float = 0.5  # share of each batch whose history the model generates (the rest: the usual samples)
    sampler: SamplerConfig = SamplerConfig()  # the engine's: 4 timesteps, a first chunk of 4 latents, then 3


@torch.no_grad()
def roll_out(
    model: SanaWMTransformer,
    anchor: torch.Tensor,
    noise: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    c2w: torch.Tensor,
    intrinsics: torch.Tensor,
    sampler: SamplerConfig,
) -> torch.Tensor:
    """The model's own clean latents ``(B, C, T, h, w)`` for the frames of ``noise``, chunk by chunk as the engine
    makes them: latent frame 0 is ``anchor`` ``(B, C, h, w)``; each chunk is denoised reading the session state,
    then written into it (except the last, which nothing reads)."""
    state = model.new_state()
    spans = chunk_spans(noise.shape[2], sampler)
    out = []
    with autocast(noise.device):
        for start, end in spans:
            def denoise(x: torch.Tensor, timestep: torch.Tensor, write: bool) -> torch.Tensor:
                return model(x, timestep, *text, c2w, intrinsics, mode="streaming", state=state, start_frame=start, write_state=write)

            x = denoise_chunk(denoise, noise[:, :, start:end], sampler, anchor if start == 0 else None)
            if end < noise.shape[2]:
                write_chunk(denoise, x)
            out.append(x.float())
    return torch.cat(out, dim=2)


class RolloutTask(DiTTask):
    """Step ``s``'s loss with self-generated history for part of the batch (the module docstring's rollout
    phase); everything random, the sampler's noise too, comes from ``step_generator(seed, s)``."""

    def __init__(
        self, model: SanaWMTransformer, pool: LatentPool, noise: NoiseConfig, rollout: RolloutConfig, batch: int, prompt: str, seed: int,
        device: torch.device, compile_forward: bool = False,
    ) -> None:
        super().__init__(model, pool, noise, batch, prompt, seed, device, compile_forward)
        config, frames = model.config, pool.latents.shape[2]
        fits = (frames - config.first_chunk_frames) // config.chunk_frames
        if (config.first_chunk_frames, config.chunk_frames) != (rollout.sampler.first_chunk_frames, rollout.sampler.chunk_frames):
            raise ValueError("the rollout sampler's chunks must be the model's")
        if not 1 <= rollout.chunks <= fits:
            raise ValueError(
                f"clips of {frames} latents hold 1..{fits} generated chunks before a trained one, not {rollout.chunks}; "
                f"{rollout.chunks} need {config.first_chunk_frames + rollout.chunks * config.chunk_frames} latents "
                f"({8 * (config.first_chunk_frames + rollout.chunks * config.chunk_frames - 1) + 1}-frame clips)"
            )
        self.rollout = rollout

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        config, generator = self.model.config, step_generator(self.seed, step)
        clips = torch.randint(len(self.pool.latents), (self.batch_size,), generator=generator)
        n = int(torch.randint(1, self.rollout.chunks + 1, (1,), generator=generator))
        history = config.first_chunk_frames + (n - 1) * config.chunk_frames  # latent frames the model generates
        frames = history + config.chunk_frames
        t = chunk_timesteps(generator, self.batch_size, chunk_bounds(frames, config.first_chunk_frames, config.chunk_frames), self.noise)
        x0 = self.pool.latents[clips, :, :frames]  # (B, C, frames, h, w), a copy (advanced indexing)
        noise = torch.randn(x0.shape, generator=generator)
        sampler_noise = torch.randn(x0[:, :, :history].shape, generator=generator)
        rolled = (torch.rand(self.batch_size, generator=generator) < self.rollout.p_rollout).nonzero()[:, 0]
        c2w = self.pool.poses[clips].to(self.device)
        intrinsics = self.pool.intrinsics.expand(*c2w.shape[:2], 4).to(self.device)
        if len(rolled):
            text = tuple(part[: len(rolled)] for part in self.text)
            x0[rolled, :, :history] = roll_out(
                self.model, x0[rolled, :, 0].to(self.device), sampler_noise[rolled].to(self.device), text,
                c2w[rolled.to(self.device)], intrinsics[rolled.to(self.device)], self.rollout.sampler,
            ).cpu()
            t[rolled, :history] = 0.0
        loss = flow_matching_loss(self.forward, x0.to(self.device), t, noise.to(self.device), self.text, c2w, intrinsics)
        return loss, {"noisy_frames": float((t > 0).float().mean()), "rollout_chunks": float(n), "rolled": len(rolled) / self.batch_size}


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


# The DiT's layers whose shapes follow the VAE's latent channels.
LATENT_LAYERS = frozenset({"x_embedder.proj.weight", "final_layer.linear.weight", "final_layer.linear.bias"})


def load_exported(model: SanaWMTransformer, folder: Path) -> None:
    """Load ``folder/transformer/`` weights (written by :func:`export_dit`, one file or shards) into ``model`` in its
    own dtype, strictly, except that the :data:`LATENT_LAYERS` of a DiT of another latent width keep their fresh
    initialisation (the trunk of a DiT reused over a new VAE)."""
    path = folder / "transformer"
    if not any(path.glob("*.safetensors")):
        raise SystemExit(f"{path}: no exported DiT weights")
    stored, own = load_state_dict(path), model.state_dict()
    if stored.keys() != own.keys():
        raise SystemExit(f"{path}: keys differ from the model's (missing {sorted(own.keys() - stored.keys())[:4]}, "
                         f"unexpected {sorted(stored.keys() - own.keys())[:4]})")
    fresh = sorted(k for k in own if stored[k].shape != own[k].shape)
    if set(fresh) - LATENT_LAYERS:
        raise SystemExit(f"{path}: shapes differ from the model's beyond the latent-channel layers: {sorted(set(fresh) - LATENT_LAYERS)}")
    model.load_state_dict({**stored, **{k: own[k] for k in fresh}}, strict=True)
    log.info("started from %s%s", path, f" (fresh {', '.join(fresh)}: another latent width)" if fresh else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_lr=3e-4)
    parser.add_argument("--vae", required=True, help="the trained VAE folder (train_vae --export)")
    parser.add_argument("--latents", help="cache of the clips encoded by that VAE (default OUT/latents.pt; written if missing)")
    parser.add_argument("--model", default="demo", help="DiT preset (world_model.config.PRESETS)")
    parser.add_argument("--init", help="start from the weights of an exported folder (--export) with a fresh optimizer")
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--p-schedule", type=float, default=NoiseConfig.p_schedule)
    parser.add_argument("--p-clean-history", type=float, default=NoiseConfig.p_clean_history)
    parser.add_argument("--rollout-chunks", type=int, default=0, help="rollout phase: most chunks the model generates as history (0: the usual phase)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss's forward (rollout phase: one graph per history length)")
    parser.add_argument("--p-rollout", type=float, default=RolloutConfig.p_rollout, help="rollout phase: share of each batch with generated history")
    return parser.parse_args(argv)


def latent_pool(args: argparse.Namespace, out: Path, device: torch.device) -> LatentPool:
    """The cached latents of the run, or the clips encoded now (and cached) by the VAE of ``--vae``."""
    cache = Path(args.latents) if args.latents else out / LATENTS_NAME
    if cache.is_file():
        return LatentPool.load(cache)
    vae = VideoVAE.from_pretrained(args.vae, dtype=torch.float32, device=device)
    pool = LatentPool.encode(vae, load_clips(args.data, args.clips, args.frames, args.width, args.height, args.workers))
    cache.parent.mkdir(parents=True, exist_ok=True)
    pool.save(cache)
    return pool


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    out = Path(args.out)
    pool = latent_pool(args, out, device)
    model = new_transformer(preset(args.model, in_channels=pool.latents.shape[1]), args.seed)  # the VAE's latent width
    if args.init:
        if args.resume:
            raise SystemExit("--init and --resume exclude each other")
        load_exported(model, Path(args.init))
    model = model.to(device)
    count = sum(p.numel() for p in model.parameters())
    log.info("DiT %s: %d parameters (%.1f MB in bf16); latents %s", args.model, count, parameter_bytes(model) / 1e6, tuple(pool.latents.shape))
    noise = NoiseConfig(p_schedule=args.p_schedule, p_clean_history=args.p_clean_history)
    if args.rollout_chunks:
        rollout = RolloutConfig(chunks=args.rollout_chunks, p_rollout=args.p_rollout)
        task = RolloutTask(model, pool, noise, rollout, args.batch, args.prompt, args.seed, device, args.compile)
    else:
        task = DiTTask(model, pool, noise, args.batch, args.prompt, args.seed, device, args.compile)
    train(model, task.loss, loop_config(args), out, resume=args.resume, stop_at=args.stop_at)
    if args.export:
        log.info("exported to %s", export_dit(model, Path(args.vae), args.export))


if __name__ == "__main__":
    main()
