"""Camera geometry for the two camera branches (sana-wm.md C).

Inputs are OpenCV camera-to-world poses per *pixel* frame (+X right, +Y down, +Z forward) and pinhole
intrinsics ``[fx, fy, cx, cy]`` in pixels of the decoded video. The model sees them as

* ``raymap`` ``(B, T, 20)``: per latent frame k, the pose of pixel frame 8k relative to pixel frame 0
  (flattened row-major) and the intrinsics scaled to the latent grid; it drives the UCPE branch;
* ``plucker`` ``(B, 48, T, H, W)``: for latent k >= 1 the pixel frames 8k-7 .. 8k, for k = 0 the frames
  0 .. 7, each giving a unit world ray d and its moment o x d at every latent pixel (frame-major).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VAE_TIME_STRIDE = 8
VAE_SPATIAL_STRIDE = 32


@dataclass
class CameraInputs:
    """What the DiT reads of the camera for a run of latent frames."""

    raymap: torch.Tensor  # (B, T, 20): relative c2w flattened (16) + fx, fy, cx, cy on the latent grid
    plucker: torch.Tensor  # (B, 6 * 8, T, H, W): Plücker rays of the 8 pixel frames of each latent frame

    def frames(self, start: int, end: int) -> "CameraInputs":
        """The slice of latent frames ``[start, end)``."""
        return CameraInputs(self.raymap[:, start:end], self.plucker[:, :, start:end])


def pixel_frames_for(latent_frames: int) -> int:
    """Pixel frames covered by ``latent_frames`` latents of the causal VAE (8k + 1)."""
    return VAE_TIME_STRIDE * (latent_frames - 1) + 1


def relative_poses(c2w: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Poses of frames ``[start, end)`` of ``(B, F, 4, 4)`` re-expressed relative to frame 0 (which becomes
    exactly the identity); only the span is computed."""
    rel = invert_se3(c2w[:, :1]) @ c2w[:, start:end]
    if start == 0:
        rel[:, 0] = torch.eye(4, dtype=c2w.dtype, device=c2w.device)
    return rel


def invert_se3(m: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of rigid 4x4 transforms ``(..., 4, 4)``."""
    rot_t = m[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(m)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ m[..., :3, 3:]).squeeze(-1)
    out[..., 3, 3] = 1.0
    return out


def camera_inputs(
    c2w: torch.Tensor, intrinsics: torch.Tensor, latent_frames: int, latent_hw: tuple[int, int], *, first_latent: int = 0
) -> CameraInputs:
    """Build the raymap and Plücker tensors for latent frames ``first_latent .. first_latent+latent_frames-1``.

    Args:
        c2w: ``(B, F, 4, 4)`` poses of pixel frames ``0 .. F-1`` with ``F >= 8 (first_latent + latent_frames - 1) + 1``;
            only frame 0 (the reference) and the frames these latents read are used.
        intrinsics: ``(B, F, 4)`` fx, fy, cx, cy in pixels of the decoded video.
        latent_frames: number of latent frames to build.
        latent_hw: latent grid ``(H, W)``; the video is ``(32 H, 32 W)`` pixels.
        first_latent: the first latent frame to build (a streaming chunk's start).
    """
    batch, num_pixel = c2w.shape[:2]
    needed = pixel_frames_for(first_latent + latent_frames)
    if c2w.shape[-2:] != (4, 4) or intrinsics.shape[:2] != (batch, num_pixel) or intrinsics.shape[-1] != 4:
        raise ValueError(
            f"c2w must be (B, F, 4, 4) and intrinsics (B, F, 4); got {tuple(c2w.shape)} and {tuple(intrinsics.shape)}"
        )
    if num_pixel < needed:
        raise ValueError(f"{first_latent + latent_frames} latent frames need {needed} camera poses; got {num_pixel}")
    start, end = chunk_pixel_span(first_latent, latent_frames)
    poses = relative_poses(c2w.float(), start, end)
    return chunk_camera_inputs(poses, intrinsics[:, start:end], first_latent, latent_frames, latent_hw)


def chunk_pixel_span(first_latent: int, latent_frames: int) -> tuple[int, int]:
    """``[start, end)`` of the pixel frames whose poses latents ``first_latent ..`` (``latent_frames`` of
    them) read: latent k reads frames 8k-7 .. 8k (0 .. 7 for k = 0, clamped to the frames that exist)."""
    return max(0, VAE_TIME_STRIDE * first_latent - (VAE_TIME_STRIDE - 1)), pixel_frames_for(first_latent + latent_frames)


def chunk_camera_inputs(
    poses: torch.Tensor, intrinsics: torch.Tensor, first_latent: int, latent_frames: int, latent_hw: tuple[int, int]
) -> CameraInputs:
    """Camera inputs of latents ``first_latent .. first_latent + latent_frames - 1`` from the poses of just
    the pixel frames they read (``chunk_pixel_span``), already relative to the session's frame 0.

    This is what a streaming session needs per chunk: nothing of its older poses.
    """
    start, end = chunk_pixel_span(first_latent, latent_frames)
    batch = poses.shape[0]
    if poses.shape[1:] != (end - start, 4, 4) or intrinsics.shape[1:] != (end - start, 4):
        raise ValueError(f"latents {first_latent}+{latent_frames} need poses (B, {end - start}, 4, 4) and intrinsics (B, {end - start}, 4); got {tuple(poses.shape)} and {tuple(intrinsics.shape)}")
    height, width = latent_hw
    poses = poses.float()
    k_lat = intrinsics.float() / VAE_SPATIAL_STRIDE  # the latent grid is the pixel grid / 32

    key_frames = (torch.arange(latent_frames, device=poses.device) + first_latent) * VAE_TIME_STRIDE
    local = key_frames - start
    raymap = torch.cat([poses[:, local].flatten(2), k_lat[:, local]], dim=-1)

    first = (key_frames - (VAE_TIME_STRIDE - 1)).clamp(min=0) - start
    window = (first[:, None] + torch.arange(VAE_TIME_STRIDE, device=poses.device)).clamp(max=end - start - 1)  # (T, 8)
    rays = plucker_rays(poses[:, window.flatten()], k_lat[:, window.flatten()], latent_hw)  # (B, T*8, H, W, 6)
    plucker = rays.reshape(batch, latent_frames, VAE_TIME_STRIDE, height, width, 6)
    plucker = plucker.permute(0, 2, 5, 1, 3, 4).reshape(batch, VAE_TIME_STRIDE * 6, latent_frames, height, width)
    return CameraInputs(raymap=raymap, plucker=plucker)


def pixel_rays(intrinsics: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Camera-frame directions ``(..., H, W, 3)`` through the integer latent pixel coordinates (unnormalised)."""
    height, width = latent_hw
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=intrinsics.dtype, device=intrinsics.device),
        torch.arange(width, dtype=intrinsics.dtype, device=intrinsics.device),
        indexing="ij",
    )
    fx, fy, cx, cy = (intrinsics[..., i, None, None] for i in range(4))
    return torch.stack([(xs - cx) / fx, (ys - cy) / fy, torch.ones_like(xs - cx)], dim=-1)


def plucker_rays(poses: torch.Tensor, intrinsics: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Plücker coordinates ``(..., H, W, 6)`` = (unit world direction d, moment o x d)."""
    dirs = torch.einsum("...ij,...hwj->...hwi", poses[..., :3, :3], pixel_rays(intrinsics, latent_hw))
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origin = poses[..., None, None, :3, 3].expand_as(dirs)
    return torch.cat([dirs, torch.linalg.cross(origin, dirs, dim=-1)], dim=-1)


def ray_transforms(raymap: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per-token world -> ray-local SE(3) ``P`` of the UCPE branch, ``(B, T*H*W, 4, 4)``.

    Each latent pixel's ray through a pinhole camera defines a frame: z along the ray, x = cam_y x z,
    y = z x x. ``P = [R^T | -R^T t]``. Tokens whose ray is not finite get the identity.
    """
    batch, frames = raymap.shape[:2]
    pose = raymap[..., :16].reshape(batch, frames, 4, 4)
    rot, trans = pose[..., :3, :3], pose[..., :3, 3]
    d_cam = pixel_rays(raymap[..., 16:20], latent_hw)  # (B, T, H, W, 3)
    d_cam = d_cam / d_cam.norm(dim=-1, keepdim=True)
    d_world = torch.einsum("btij,bthwj->bthwi", rot, d_cam)
    cam_y = rot[..., :, 1][:, :, None, None, :].expand_as(d_world)
    z_axis = F.normalize(d_world, dim=-1, eps=1e-6)
    x_axis = F.normalize(torch.linalg.cross(cam_y, z_axis, dim=-1), dim=-1, eps=1e-6)
    y_axis = F.normalize(torch.linalg.cross(z_axis, x_axis, dim=-1), dim=-1, eps=1e-6)
    world_to_ray = torch.stack([x_axis, y_axis, z_axis], dim=-1).transpose(-1, -2)  # (B, T, H, W, 3, 3)
    mats = torch.zeros(*world_to_ray.shape[:-2], 4, 4, dtype=raymap.dtype, device=raymap.device)
    mats[..., :3, :3] = world_to_ray
    mats[..., :3, 3] = -torch.einsum("bthwij,btj->bthwi", world_to_ray, trans)
    mats[..., 3, 3] = 1.0
    bad = ~torch.isfinite(d_world).all(-1)
    mats[bad] = torch.eye(4, dtype=raymap.dtype, device=raymap.device)
    return mats.reshape(batch, -1, 4, 4)
