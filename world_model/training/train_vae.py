"""Train the video VAE (diffusers' ``AutoencoderKLLTX2Video``, causal decoder) on rendered clips.

Each step cuts a random ``window`` of pixel frames (8k + 1) out of random clips, encodes them, samples the
posterior and decodes causally. The loss is the L1 of the reconstruction, plus the L1 of its spatial
gradients (edges are what a small decoder blurs first) and a small KL of the posterior against N(0, 1)
(it keeps the latent scale tame for the DiT). ``--export`` then measures each latent channel's mean and
std over the training clips, stores them as ``latents_mean`` / ``latents_std`` (so the model-space latents
the DiT sees are ~N(0, 1)) and writes a diffusers folder that ``VideoVAE.from_pretrained`` loads.

On a GPU, one 28-minute slot at a time (the second and later with ``--resume``)::

    python -m world_model.training.train_vae --data shards/ --out runs/vae --device cuda --minutes 28
    python -m world_model.training.train_vae --data shards/ --out runs/vae --device cuda --minutes 28 --resume --export runs/demo/vae

``--temporal-weight`` adds the L1 between the frame-to-frame changes of the reconstruction and of the clip:
a decoder that draws the 8 frames of a latent alike is right on average but wrong in every change between
them, which the plain L1 barely sees. ``--init VAE --decoder-only`` fine-tunes the decoder of an exported VAE
and keeps its encoder and latent statistics, so the DiT trained on its latents runs unchanged over the new
decoder; its step is cheap enough for a CPU::

    python -m world_model.training.train_vae --init world_model/demo/vae --decoder-only --temporal-weight 2 \\
        --clips 256 --frames 25 --batch 4 --lr 2e-4 --warmup 50 --steps 0 --minutes 40 --out runs/dec --export runs/dec/vae
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLLTX2Video
from safetensors.torch import save_file

from world_model.training.common import (
    ClipPool,
    add_common_arguments,
    autocast,
    encode_clips,
    load_clips,
    loop_config,
    step_generator,
    to_pixels,
    train,
)
from world_model.vae import VideoVAE

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class VAELossConfig:
    window: int = 17  # pixel frames per sample (8k + 1), cut at a random start out of each clip
    batch: int = 8  # samples per step
    kl_weight: float = 1e-4  # weight of the per-element KL of the posterior against N(0, 1)
    edge_weight: float = 0.5  # weight of the L1 between spatial gradients of output and target
    temporal_weight: float = 0.0  # weight of the L1 between the frame-to-frame changes of output and target


def difference_l1(output: torch.Tensor, target: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean L1 between the finite differences along ``dim`` of two videos ``(B, 3, F, H, W)``."""
    return (output.diff(dim=dim) - target.diff(dim=dim)).abs().mean()


def edge_l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical finite differences of two videos ``(B, 3, F, H, W)``."""
    return difference_l1(output, target, -1) + difference_l1(output, target, -2)


def vae_loss(
    model: AutoencoderKLLTX2Video, video: torch.Tensor, generator: torch.Generator, config: VAELossConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of reconstructing ``video`` ``(B, 3, F, H, W)`` in [-1, 1] through a posterior sample (noise from ``generator``)."""
    with autocast(video.device):
        posterior = model.encode(video, causal=True).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(video.device)
        recon = model.decoder(posterior.mean + posterior.std * eps, causal=True).float()
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    l1 = (recon - video).abs().mean()
    edge = edge_l1(recon, video)
    temporal = difference_l1(recon, video, dim=2)
    loss = l1 + config.edge_weight * edge + config.temporal_weight * temporal + config.kl_weight * kl
    return loss, {"l1": l1.item(), "edge": edge.item(), "temporal": temporal.item(), "kl": kl.item()}


class VAETask:
    """Step ``s``'s loss: a batch of random windows and posterior noise, all drawn from ``step_generator(seed, s)``."""

    def __init__(self, model: AutoencoderKLLTX2Video, pool: ClipPool, config: VAELossConfig, seed: int, device: torch.device) -> None:
        clip_frames = pool.frames.shape[1]
        if config.window > clip_frames or (config.window - 1) % 8:
            raise ValueError(f"window must be 8k + 1 frames and at most the clip length {clip_frames}; got {config.window}")
        self.model, self.pool, self.config, self.seed, self.device = model, pool, config, seed, device

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        """A video ``(B, 3, window, H, W)`` of random windows of random clips."""
        count = self.pool.frames.shape[1] - self.config.window + 1
        clips = torch.randint(len(self.pool), (self.config.batch,), generator=generator).tolist()
        starts = torch.randint(count, (self.config.batch,), generator=generator).tolist()
        frames = np.stack([self.pool.frames[c, s : s + self.config.window] for c, s in zip(clips, starts)])
        return to_pixels(frames, self.device)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        generator = step_generator(self.seed, step)
        return vae_loss(self.model, self.batch(generator), generator, self.config)


@torch.no_grad()
def set_latent_statistics(vae: VideoVAE, pool: ClipPool, max_clips: int = 256) -> None:
    """Set ``latents_mean`` / ``latents_std`` to each channel's statistics over (up to ``max_clips``) training clips
    and the scaling factor to 1, so that the normalised latents are ~N(0, 1) per channel."""
    subset = ClipPool(pool.frames[:max_clips], pool.poses[:max_clips], pool.intrinsics)
    z = encode_clips(vae, subset, normalised=False).transpose(0, 1).flatten(1)  # (C, N * T * h * w)
    vae.model.latents_mean.copy_(z.mean(1))
    vae.model.latents_std.copy_(z.std(1).clamp_min(1e-4))
    vae.model.register_to_config(scaling_factor=1.0)


def export_vae(vae: VideoVAE, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``config.json`` and the weights (in ``dtype``) as a diffusers folder ``VideoVAE.from_pretrained`` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.model.save_config(folder)
    weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in vae.model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_NAME))
    return folder


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_lr=1e-3)
    parser.add_argument("--preset", default="demo-wide", help="VAE preset (world_model.vae.VAE_PRESETS; the shipped model's is demo)")
    parser.add_argument("--window", type=int, default=VAELossConfig.window, help="pixel frames per sample (8k + 1)")
    parser.add_argument("--kl-weight", type=float, default=VAELossConfig.kl_weight)
    parser.add_argument("--edge-weight", type=float, default=VAELossConfig.edge_weight)
    parser.add_argument("--temporal-weight", type=float, default=VAELossConfig.temporal_weight,
                        help="weight of the L1 between the frame-to-frame changes of the reconstruction and the clip")
    parser.add_argument("--init", help="start from the weights of an exported VAE folder (its config replaces --preset)")
    parser.add_argument("--decoder-only", action="store_true",
                        help="with --init: train the decoder alone; the encoder and its latent statistics stay, so a DiT "
                             "trained on that VAE's latents keeps working with the new decoder")
    parser.add_argument("--export-dtype", choices=sorted(EXPORT_DTYPES), default="bf16")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.decoder_only and not args.init:  # before the clips are rendered, which can take minutes
        raise SystemExit("--decoder-only needs --init (the VAE whose encoder stays)")
    device = torch.device(args.device)
    pool = load_clips(args.data, args.clips, args.frames, args.width, args.height, args.workers)
    if args.init:
        vae = VideoVAE.from_pretrained(args.init, dtype=torch.float32, device=device)
    else:
        vae = VideoVAE.from_preset(args.preset, seed=args.seed, device=device)
    model = vae.model.requires_grad_(True)
    if args.decoder_only:
        model.encoder.requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("VAE %s: %d parameters, %d trained; %d clips of %s", args.init or args.preset, sum(p.numel() for p in model.parameters()),
             trained, len(pool), pool.frames.shape[1:])
    config = VAELossConfig(window=args.window, batch=args.batch, kl_weight=args.kl_weight, edge_weight=args.edge_weight,
                           temporal_weight=args.temporal_weight)
    task = VAETask(model, pool, config, args.seed, device)
    out = Path(args.out)
    train(model, task.loss, loop_config(args), out, resume=args.resume, stop_at=args.stop_at)
    if args.export:
        model.requires_grad_(False)
        if not args.decoder_only:  # the encoder changed: the DiT's latent space is measured anew
            set_latent_statistics(vae, pool)
        log.info("latent mean %s, std %s", vae.model.latents_mean.tolist(), vae.model.latents_std.tolist())
        log.info("exported to %s", export_vae(vae, args.export, EXPORT_DTYPES[args.export_dtype]))


if __name__ == "__main__":
    main()
