"""Timestep schedules and the Euler step of the flow-matching samplers (sana-wm.md E).

Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps; the DiT predicts v = eps - x0, so an Euler step from
sigma to sigma_next is x - (sigma - sigma_next) v, in fp32.
"""

from __future__ import annotations

import torch

# The distilled streaming release: four denoising forwards at these timesteps, then straight to 0.
STREAMING_TIMESTEPS = (1000, 960, 889, 727)


def sigmas(timesteps: tuple[int, ...] | list[int]) -> list[float]:
    """The sigma of each step followed by the final 0."""
    return [t / 1000.0 for t in timesteps] + [0.0]


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float, frozen: torch.Tensor | None = None) -> torch.Tensor:
    """One Euler step on ``(B, C, T, H, W)``; latent frames where ``frozen`` ``(T,)`` is True keep their value."""
    out = (x.float() - (sigma - sigma_next) * velocity.float()).to(x.dtype)
    if frozen is not None:
        out[:, :, frozen] = x[:, :, frozen]
    return out
