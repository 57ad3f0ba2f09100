"""Training clips: procedural scenes rendered along random key-driven camera trajectories.

Each clip is fully determined by its seed: the seed draws the :class:`~world_model.training.scenes.Scene`
and an action script in the project's DSL (``"w-12, d-7, none-5, ..."``); the script is rolled out by
:func:`world_model.controls.trajectory`, the same dynamics the live rig uses, so the poses stored with
the frames are exactly the ones the model will be conditioned on. Clips have ``8k + 1`` frames because
the causal VAE maps ``8k + 1`` pixel frames to ``k + 1`` latents.

Shards are compressed ``.npz`` files holding a batch of clips (see :func:`write_shard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from world_model.camera import VAE_TIME_STRIDE
from world_model.controls import CameraParams, intrinsics_for, parse_actions, trajectory
from world_model.training.scenes import Scene, SceneConfig

MOVES = "wsjl"  # translation keys
TURNS = "adik"  # rotation keys


@dataclass(frozen=True)
class ScriptConfig:
    """How random action scripts are drawn."""

    segment_frames: tuple[int, int] = (4, 20)  # inclusive range of a segment's length in frames
    p_none: float = 0.12  # chance a segment holds no key (the camera coasts to a stop)
    p_combo: float = 0.2  # chance a segment holds one translation key and one rotation key together


def random_script(rng: np.random.Generator, steps: int, config: ScriptConfig = ScriptConfig()) -> str:
    """An action script of exactly ``steps`` frames made of random segments.

    Single keys of ``wasdijkl`` are equally likely, so every control is covered; some segments hold
    nothing and some combine a move with a turn (``"wd"``), as players do.
    """
    if steps < 1:
        raise ValueError(f"a script needs at least one step; got {steps}")
    segments, total = [], 0
    while total < steps:
        draw = rng.random()
        if draw < config.p_none:
            keys = "none"
        elif draw < config.p_none + config.p_combo:
            keys = str(rng.choice(list(MOVES))) + str(rng.choice(list(TURNS)))
        else:
            keys = str(rng.choice(list(MOVES + TURNS)))
        length = min(int(rng.integers(config.segment_frames[0], config.segment_frames[1] + 1)), steps - total)
        segments.append(f"{keys}-{length}")
        total += length
    return ", ".join(segments)


def clip_script(seed: int, frames: int, config: ScriptConfig = ScriptConfig()) -> str:
    """The action script of clip ``seed``: ``frames - 1`` steps, drawn from a stream apart from the scene's."""
    return random_script(np.random.default_rng([seed, 1]), frames - 1, config)


def check_clip_length(frames: int) -> None:
    """Refuse clip lengths the causal VAE cannot encode whole (it needs ``8k + 1`` frames, ``k >= 1``)."""
    if frames < VAE_TIME_STRIDE + 1 or (frames - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"clips need 8k + 1 frames (e.g. 49 or 97) with k >= 1; got {frames}")


def render_clip(
    seed: int,
    frames: int = 49,
    width: int = 256,
    height: int = 144,
    fov_deg: float = 60.0,
    scene_config: SceneConfig = SceneConfig(),
    script_config: ScriptConfig = ScriptConfig(),
    camera: CameraParams = CameraParams(),
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render clip ``seed``.

    Returns ``frames`` ``(F, H, W, 3)`` uint8, ``poses`` ``(F, 4, 4)`` float64 camera-to-world (the first
    the identity) and ``actions``: ``F - 1`` strings, ``actions[i]`` the sorted keys held on the step from
    frame ``i`` to ``i + 1`` (``""`` for none); :func:`actions_to_script` turns them back into a script.
    """
    check_clip_length(frames)
    script = clip_script(seed, frames, script_config)
    poses = trajectory(script, frames, camera)
    scene = Scene(seed, scene_config)
    intrinsics = intrinsics_for(width, height, fov_deg)
    video = np.stack([scene.render(pose, intrinsics, width, height) for pose in poses])
    actions = ["".join(sorted(keys)) for keys in parse_actions(script)]
    return video, poses, actions


def actions_to_script(actions: Sequence[str]) -> str:
    """Run-length encode per-step key strings (``""`` = no key) into the DSL, e.g. ``"w-3, none-2"``."""
    if not actions:
        raise ValueError("no actions to encode")
    segments: list[list] = []
    for keys in actions:
        name = keys or "none"
        if segments and segments[-1][0] == name:
            segments[-1][1] += 1
        else:
            segments.append([name, 1])
    return ", ".join(f"{name}-{count}" for name, count in segments)


@dataclass(frozen=True)
class Shard:
    """The clips of one shard file; arrays are indexed by clip first."""

    frames: np.ndarray  # (N, F, H, W, 3) uint8
    poses: np.ndarray  # (N, F, 4, 4) float32 camera-to-world, OpenCV axes, frame 0 the identity
    intrinsics: np.ndarray  # (4,) float32 fx, fy, cx, cy in pixels, shared by all clips
    seeds: np.ndarray  # (N,) int64: render_clip(seed) reproduces the clip
    scripts: list[str]  # N action scripts (DSL) that produced the poses
    fps: float  # pixel frames per second of the camera dynamics


def write_shard(
    path: str | Path,
    seeds: Sequence[int],
    frames: int = 49,
    width: int = 256,
    height: int = 144,
    fov_deg: float = 60.0,
    scene_config: SceneConfig = SceneConfig(),
    script_config: ScriptConfig = ScriptConfig(),
    camera: CameraParams = CameraParams(),
) -> Path:
    """Render the clips of ``seeds`` and save them to ``path`` as a compressed ``.npz`` (see :class:`Shard`).

    The arrays are a deterministic function of the seeds and settings (the zip's timestamps are not).
    """
    if not seeds:
        raise ValueError("a shard needs at least one seed")
    clips = [render_clip(s, frames, width, height, fov_deg, scene_config, script_config, camera) for s in seeds]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a file object keeps numpy from appending ".npz" to the name
        np.savez_compressed(
            handle,
            frames=np.stack([video for video, _, _ in clips]),
            poses=np.stack([poses for _, poses, _ in clips]).astype(np.float32),
            intrinsics=intrinsics_for(width, height, fov_deg).astype(np.float32),
            seeds=np.asarray(seeds, np.int64),
            scripts=np.array([actions_to_script(actions) for _, _, actions in clips]),
            fps=np.float64(camera.fps),
        )
    return path


def read_shard(path: str | Path) -> Shard:
    """Load a shard written by :func:`write_shard` (no pickle involved)."""
    with np.load(path, allow_pickle=False) as data:
        return Shard(
            frames=data["frames"],
            poses=data["poses"],
            intrinsics=data["intrinsics"],
            seeds=data["seeds"],
            scripts=[str(s) for s in data["scripts"]],
            fps=float(data["fps"]),
        )
