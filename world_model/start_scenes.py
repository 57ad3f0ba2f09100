"""Named start scenes: frames of the procedural renderer the demo model was trained on.

The demo model only knows the renderer's worlds (a textured ground, sky, simple shapes), so its sessions
start from one of them. Every scene here is a held-out renderer seed (training used seeds 0..2047; seeds
from 1,000,000 on are never trained on), seen from the identity pose with the engine's intrinsics, as the
first frame of a training clip is. Torch-free: the server lists and renders these too. The renderer
(``world_model.training.scenes``, numpy only) is imported on the first render, not with this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .controls import intrinsics_for

# The one prompt the demo model was trained with (``world_model.training.train_dit`` trains with it; kept here,
# torch-free, for the server and the scenes).
DEMO_PROMPT = "a walk through a sunny world of simple shapes"


@dataclass(frozen=True)
class StartScene:
    id: str  # URL-safe name: /v1/scenes/{id}.png, {"scene": id}
    title: str  # shown to people
    seed: int  # the renderer's scene seed (held out: >= 1,000,000)
    prompt: str = DEMO_PROMPT  # a prompt that suits the scene


START_SCENES: tuple[StartScene, ...] = (
    StartScene("spheres", "Two spheres", 1_000_000),
    StartScene("pillar", "Pillar and blocks", 1_000_002),
    StartScene("big-ball", "Big ball", 1_000_006),
    StartScene("teal-haze", "Teal haze", 1_000_005),
)
DEFAULT_SCENE = START_SCENES[0]  # the demo model's start image when a session brings none


def find_scene(scene_id: str) -> StartScene | None:
    """The scene called ``scene_id``, or None."""
    return next((s for s in START_SCENES if s.id == scene_id), None)


def render_scene(scene: StartScene, width: int, height: int, fov_deg: float = 60.0) -> np.ndarray:
    """``(height, width, 3)`` uint8 RGB: ``scene`` from the identity pose, ``fov_deg`` horizontal field of view."""
    from .training.scenes import Scene  # numpy only, but kept off the import path of everything else

    return Scene(scene.seed).render(np.eye(4), np.asarray(intrinsics_for(width, height, fov_deg)), width, height)
