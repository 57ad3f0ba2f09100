"""The procedural scenes and their ray caster: geometry conventions and image motion under each key."""

from __future__ import annotations

import math

import numpy as np
import pytest

from world_model.controls import intrinsics_for, trajectory
from world_model.training.metrics import phase_correlation
from world_model.training.scenes import Scene, camera_rays

WIDTH, HEIGHT = 256, 144
K = intrinsics_for(WIDTH, HEIGHT, 60.0)
STEP_PX = K[0] * math.tan(math.radians(0.6))  # image shift of one full-speed rotation step at the centre


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene(7)


def _frames(scene: Scene, script: str, frames: int) -> list[np.ndarray]:
    return [scene.render(pose, K, WIDTH, HEIGHT) for pose in trajectory(script, frames)]


def test_centre_pixel_looks_along_pose_z():
    pose = trajectory("d-20, i-15, w-5", 40)[-1]
    rays = camera_rays(pose, K, WIDTH, HEIGHT)
    cx, cy = int(K[2]), int(K[3])
    np.testing.assert_allclose(rays[cy, cx], pose[:3, 2], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rays, axis=-1), 1.0, atol=1e-5)


def test_centre_ray_lands_on_the_ground_plane(scene: Scene):
    """Looking 24 degrees down, the centre ray meets y = +h within the object-free radius."""
    pose = trajectory("k-40", 41)[-1]
    depth = scene.depth(pose, K, WIDTH, HEIGHT)
    point = pose[:3, 3] + depth[int(K[3]), int(K[2])] * pose[:3, 2]
    assert point[1] == pytest.approx(scene.ground, abs=1e-4)


def test_sky_above_ground_at_identity(scene: Scene):
    depth = scene.depth(np.eye(4), K, WIDTH, HEIGHT)
    cy = int(K[3])
    assert np.isfinite(depth[cy + 1 :]).all(), "every ray below the horizon hits the ground or an object"
    assert np.isinf(depth[:cy]).mean() > 0.6, "most rays above the horizon see the sky"
    image = scene.render(np.eye(4), K, WIDTH, HEIGHT).astype(float)
    sky, ground = image[:cy][np.isinf(depth[:cy])], image[cy + 1 :]
    assert sky[:, 2].mean() > ground[:, 2].mean() or sky.mean() > ground.mean()


def test_yaw_right_moves_content_left(scene: Scene):
    frames = _frames(scene, "d-8", 9)
    shifts = np.array([phase_correlation(a, b) for a, b in zip(frames, frames[1:])])
    assert np.all(np.abs(shifts[:, 0]) < 0.5)
    np.testing.assert_allclose(shifts[:, 1], -STEP_PX, rtol=0.3)


def test_yaw_left_moves_content_right(scene: Scene):
    frames = _frames(scene, "a-4", 5)
    shifts = np.array([phase_correlation(a, b) for a, b in zip(frames, frames[1:])])
    np.testing.assert_allclose(shifts[:, 1], STEP_PX, rtol=0.3)


def test_pitch_up_moves_content_down(scene: Scene):
    frames = _frames(scene, "i-8", 9)
    shifts = np.array([phase_correlation(a, b) for a, b in zip(frames, frames[1:])])
    assert np.all(np.abs(shifts[:, 1]) < 0.5)
    np.testing.assert_allclose(shifts[:, 0], STEP_PX, rtol=0.3)


def test_forward_expands_around_the_centre(scene: Scene):
    """After 16 frames of ``w`` the lower-left ground flows left, the lower-right right, both down."""
    first, last = _frames(scene, "w-16", 17)[:: 16]
    rows = slice(HEIGHT // 2 + 8, HEIGHT)
    left_dy, left_dx = phase_correlation(first[rows, : WIDTH // 2], last[rows, : WIDTH // 2])
    right_dy, right_dx = phase_correlation(first[rows, WIDTH // 2 :], last[rows, WIDTH // 2 :])
    assert left_dx < -1.0 and right_dx > 1.0
    assert left_dy > 0.3 and right_dy > 0.3


def test_strafe_right_moves_near_content_left(scene: Scene):
    first, last = _frames(scene, "l-16", 17)[:: 16]
    rows = slice(HEIGHT - 40, HEIGHT)  # the near ground: large parallax
    _, dx = phase_correlation(first[rows], last[rows])
    assert dx < -2.0


def test_scenes_are_deterministic_and_differ_between_seeds():
    pose = trajectory("d-5", 6)[-1]
    a, b, c = (Scene(s).render(pose, K, 96, 54) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5.0


def test_objects_keep_clear_of_the_start(scene: Scene):
    """No surface lies within ``clear_radius`` of the start point, whichever way a ray leaves it."""
    dirs = np.random.default_rng(0).standard_normal((4000, 3)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = np.zeros(3, np.float32)
    nearest = min(float(obj.intersect(origin, dirs).min()) for obj in scene.objects)
    assert scene.config.clear_radius <= nearest < np.inf


def test_render_refuses_bad_inputs(scene: Scene):
    with pytest.raises(ValueError, match="pose"):
        scene.render(np.eye(3), K, WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="positive size"):
        scene.render(np.eye(4), K, 0, HEIGHT)
