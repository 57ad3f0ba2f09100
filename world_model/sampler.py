"""The self-forcing chunk sampler of the streaming release (sana-wm.md E.3).

Per chunk:
  1. denoise: for each timestep, the DiT reads the session state (never writes it) and an Euler step
     follows; the image anchor (latent frame 0 of chunk 0) stays at t = 0 and keeps its value;
  2. emit the clean latents;
  3. write: one more forward of the clean chunk at t = 0 with ``write_state=True`` advances the state.

The frames need only 1-2; a live engine shows them first and runs 3 afterwards (``denoise_chunk``, then
``write_chunk``), since nothing of the chunk waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import STREAMING_TIMESTEPS, euler_step, sigmas
from .state import SessionState


@dataclass(frozen=True)
class SamplerConfig:
    timesteps: tuple[int, ...] = STREAMING_TIMESTEPS  # denoising steps (integer timesteps in [0, 1000])
    first_chunk_frames: int = 4  # latent frames of chunk 0 (the image anchor + 3)
    chunk_frames: int = 3  # latent frames of every later chunk (1-3; 3 is the release)


# (x, timestep (B, T), write_state) -> velocity; a closure over the model, text, camera and state.
Denoiser = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def sample_chunk(denoise: Denoiser, noise: torch.Tensor, config: SamplerConfig, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise one chunk from ``noise`` ``(B, C, T, H, W)``; ``anchor`` ``(B, C, H, W)`` fixes frame 0.

    Returns the clean latents after the state-writing pass.
    """
    x = denoise_chunk(denoise, noise, config, anchor)
    write_chunk(denoise, x)
    return x


def denoise_chunk(denoise: Denoiser, noise: torch.Tensor, config: SamplerConfig, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1-2: the clean latents of one chunk; the session state is read, not written."""
    x = noise.clone()
    batch, _, frames = x.shape[:3]
    frozen = torch.zeros(frames, dtype=torch.bool)
    if anchor is not None:
        x[:, :, 0] = anchor.to(x.dtype)
        frozen[0] = True
    steps = sigmas(config.timesteps)
    for t, sigma, sigma_next in zip(config.timesteps, steps, steps[1:]):
        timestep = torch.full((batch, frames), float(t))
        timestep[:, frozen] = 0.0
        velocity = denoise(x, timestep, False)
        x = euler_step(x, velocity, sigma, sigma_next, frozen)
    return x


def write_chunk(denoise: Denoiser, x: torch.Tensor) -> None:
    """Step 3: the clean chunk ``x`` at t = 0 advances the session state."""
    denoise(x, torch.zeros(x.shape[0], x.shape[2]), True)


def chunk_spans(total_frames: int, config: SamplerConfig) -> list[tuple[int, int]]:
    """``[start, end)`` latent frames of each chunk of a session of ``total_frames`` latents."""
    spans, start = [], 0
    while start < total_frames:
        size = config.first_chunk_frames if start == 0 else config.chunk_frames
        spans.append((start, min(start + size, total_frames)))
        start = spans[-1][1]
    return spans


def stream_latents(model, state: SessionState, noise: torch.Tensor, anchor: torch.Tensor, text, text_mask, c2w, intrinsics, config: SamplerConfig = SamplerConfig()):
    """Generate all latent frames of ``noise`` ``(B, C, T, H, W)`` chunk by chunk, advancing ``state``."""
    out = []
    for start, end in chunk_spans(noise.shape[2], config):
        def denoise(x, timestep, write):
            return model(x, timestep, text, text_mask, c2w, intrinsics, mode="streaming", state=state, start_frame=start, write_state=write)

        out.append(sample_chunk(denoise, noise[:, :, start:end], config, anchor if start == 0 else None))
    return torch.cat(out, dim=2)
