"""Camera controls: every expectation below is worked out by hand from the velocity model in
world_model/controls.py (NVlabs release semantics), not by running the code a second time."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from world_model.controls import CameraParams, CameraRig, intrinsics_for, parse_actions, trajectory

SPEED = 0.025
ROT = math.radians(0.6)
DT = 1.0 / 16.0
RTOL = 1e-5  # the release shortens each step by ~1e-6 relative (norm + 1e-6); everything else is exact


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def steps(poses: np.ndarray) -> np.ndarray:
    """World-space displacement of each frame."""
    return np.diff(poses[:, :3, 3], axis=0)


def test_held_forward_moves_at_full_speed_along_z():
    poses = trajectory("w-100")
    assert poses.shape == (101, 4, 4)
    np.testing.assert_array_equal(poses[0], np.eye(4))
    # A fresh press snaps the velocity to the target, so every frame (and the steady state) moves 0.025 on +Z.
    np.testing.assert_allclose(steps(poses), np.tile([0.0, 0.0, SPEED], (100, 1)), rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(poses[-1, :3, 3], [0.0, 0.0, 100 * SPEED], rtol=RTOL)
    np.testing.assert_allclose(poses[-1, :3, :3], np.eye(3), atol=1e-15)


def test_back_moves_along_minus_z():
    np.testing.assert_allclose(trajectory("s-4")[-1, :3, 3], [0.0, 0.0, -4 * SPEED], rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize(("key", "sign"), [("d", 1.0), ("a", -1.0)])
def test_yaw_rate_and_sign(key: str, sign: float):
    poses = trajectory(f"{key}-10")
    # 0.6 deg per frame about world Y; d turns the forward axis (column 2) toward +X, a toward -X.
    np.testing.assert_allclose(poses[-1, :3, :3], rot_y(sign * 10 * ROT), atol=1e-12)
    assert np.sign(poses[-1, 0, 2]) == sign
    np.testing.assert_allclose(poses[-1, :3, 3], 0.0, atol=0)


def test_release_coasts_with_tau_coast():
    disp = np.linalg.norm(steps(trajectory("w-20,none-30")), axis=1)
    held, coast = disp[19], disp[20:]
    decay = math.exp(-DT / 1.0)
    # The first coasting frame already relaxes once; then each frame keeps exp(-1/16) of the last.
    assert coast[0] / held == pytest.approx(decay, rel=1e-9)
    np.testing.assert_allclose(coast[1:] / coast[:-1], decay, rtol=1e-9)


def test_held_key_after_partial_state_relaxes_with_tau_held():
    # "ws" snaps the velocity to its target 0; dropping "s" is no fresh press, so forward eases in:
    # v_n = 0.025 * (1 - exp(-n / (16 * 0.45))).
    poses = trajectory("ws-5,w-30")
    np.testing.assert_allclose(poses[:6, :3, 3], 0.0, atol=0)
    d = np.linalg.norm(steps(poses)[5:], axis=1)
    n = np.arange(1, 31)
    np.testing.assert_allclose(d, SPEED * (1 - np.exp(-n * DT / 0.45)), rtol=RTOL)
    gap = SPEED / (1 + 1e-6) - d
    np.testing.assert_allclose(gap[1:] / gap[:-1], math.exp(-DT / 0.45), rtol=1e-6)


def test_fresh_press_snaps_every_axis():
    # Pressing s while w is held snaps forward to its new target 0 at once.
    d = np.linalg.norm(steps(trajectory("w-10,ws-10")), axis=1)
    np.testing.assert_allclose(d[10:], 0.0, atol=0)
    # A fresh d press while forward is still coasting also stops the coast (all axes snap), and turns at full rate.
    poses = trajectory("w-20,none-5,d-3")
    np.testing.assert_allclose(steps(poses)[25:], 0.0, atol=0)
    np.testing.assert_allclose(poses[-1, :3, :3], rot_y(3 * ROT), atol=1e-12)


def test_pitch_up_saturates_at_limit():
    rig = CameraRig()
    for _ in range(50):
        pose = rig.step(frozenset("i"))
    np.testing.assert_allclose(pose[:3, :3], rot_x(50 * ROT), atol=1e-12)  # 30 degrees, still rising
    assert pose[1, 2] < 0  # forward tilts toward -Y, i.e. up
    for _ in range(150):
        pose = rig.step(frozenset("i"))
    assert rig.pitch == pytest.approx(math.radians(60.0), abs=1e-15)
    np.testing.assert_allclose(pose[:3, :3], rot_x(math.radians(60.0)), atol=1e-12)
    np.testing.assert_allclose(trajectory("k-200")[-1, :3, :3], rot_x(-math.radians(60.0)), atol=1e-12)


@pytest.mark.parametrize(("key", "sign"), [("l", 1.0), ("j", -1.0)])
def test_strafe_moves_along_x(key: str, sign: float):
    expected = np.tile([sign * SPEED, 0.0, 0.0], (5, 1))
    np.testing.assert_allclose(steps(trajectory(f"{key}-5")), expected, rtol=RTOL, atol=1e-12)


def test_forward_stays_horizontal_after_pitch_and_yaw():
    # 50 frames of i: pitch 30 deg; then w (fresh press snaps pitch velocity to 0) moves on the XZ plane.
    poses = trajectory("i-50,w-10")
    d = steps(poses)[50:]
    np.testing.assert_array_equal(d[:, 1], 0.0)
    np.testing.assert_allclose(d, np.tile([0.0, 0.0, SPEED], (10, 1)), rtol=RTOL, atol=1e-12)
    # After 30 deg of pitch and 15 frames of d (9 deg yaw), forward is (sin 9deg, 0, cos 9deg).
    d = steps(trajectory("i-50,d-15,w-4"))[-1]
    yaw = 15 * ROT
    np.testing.assert_allclose(d, [SPEED * math.sin(yaw), 0.0, SPEED * math.cos(yaw)], rtol=RTOL)


def test_parse_actions():
    w, a, none = frozenset("w"), frozenset("a"), frozenset()
    assert parse_actions("w-2， A - 1,none-1") == [w, w, a, none]
    assert parse_actions("wd-1") == [frozenset("wd")]


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("", "empty"),
        ("  \n", "empty"),
        ("w-3,x-2", "unknown keys"),
        ("w-0", "positive"),
        ("w-1.5", "positive"),
        ("w--1", "unknown keys"),  # splits at the last '-', leaving the key '-', as in the release
        ("w-abc", "positive"),
        ("w-3,,a-2", "bad action segment"),
        ("w3", "bad action segment"),
    ],
)
def test_parse_errors(script: str, message: str):
    with pytest.raises(ValueError, match=message):
        parse_actions(script)


def test_frames_repeats_last_segment_or_truncates():
    poses = trajectory("none-2,w-3", frames=40)
    assert poses.shape == (40, 4, 4)
    # Frames 1-2 idle, then w held (one snap, no re-press) through frame 39: 37 steps of 0.025.
    np.testing.assert_allclose(poses[2, :3, 3], 0.0, atol=0)
    np.testing.assert_allclose(poses[-1, :3, 3], [0.0, 0.0, 37 * SPEED], rtol=RTOL)
    # 29 steps: 3 of w (no turn), then d held for 26 frames.
    np.testing.assert_allclose(trajectory("w-3,d-2", frames=30)[-1, :3, :3], rot_y(26 * ROT), atol=1e-12)
    np.testing.assert_allclose(trajectory("w-10", frames=4)[-1, :3, 3], [0, 0, 3 * SPEED], rtol=RTOL)


def test_rebase_keeps_relative_motion_and_bounds_positions():
    rig = CameraRig()
    keys = frozenset("wd")
    before = [rig.step(keys) for _ in range(40)]
    old_pose = rig.pose
    transform = rig.rebase()
    np.testing.assert_allclose(transform @ old_pose, rig.pose, atol=1e-15)
    np.testing.assert_array_equal(rig.pose[:3, 3], 0.0)
    after = [rig.step(keys) for _ in range(2)]
    # Steady w+d: each frame turns 0.6 deg and moves 0.025 along the new heading, in camera terms the same
    # delta before and after the rebase.
    delta_before = np.linalg.inv(before[-2]) @ before[-1]
    delta_after = np.linalg.inv(after[0]) @ after[1]
    delta_across = np.linalg.inv(transform @ before[-1]) @ after[0]
    expected = np.eye(4)
    expected[:3, :3] = rot_y(ROT)
    expected[:3, 3] = [SPEED * math.sin(ROT), 0.0, SPEED * math.cos(ROT)]
    for delta in (delta_before, delta_after, delta_across):
        np.testing.assert_allclose(delta, expected, rtol=RTOL, atol=1e-12)

    rig = CameraRig()
    farthest = 0.0
    for frame in range(5000):
        rig.step(frozenset("w"))
        farthest = max(farthest, float(np.abs(rig.position).max()))
        if frame % 100 == 99:
            rig.rebase()
    assert farthest <= 100 * SPEED * (1 + 1e-9)


def test_mouse_dx_equals_one_held_yaw_frame():
    rig = CameraRig()
    pose = rig.step(frozenset(), mouse_dx=1.0)
    np.testing.assert_allclose(pose[:3, :3], rot_y(ROT), atol=1e-15)  # same as frame 1 of "d"
    pose = rig.step(frozenset(), mouse_dx=-2.0, mouse_dy=1.0)
    np.testing.assert_allclose(pose[:3, :3], rot_y(-ROT) @ rot_x(ROT), atol=1e-15)  # dy > 0 looks up, like "i"
    rig.step(frozenset(), mouse_dy=1000.0)
    assert rig.pitch == math.radians(60.0)  # mouse pitch is clamped too


def test_state_dict_roundtrip_is_plain_json():
    rig = CameraRig(CameraParams(translation_speed=0.05))
    for keys in ("wd", "wd", "w", "i"):
        rig.step(frozenset(keys), mouse_dx=0.5)
    state = json.loads(json.dumps(rig.state_dict()))
    copy = CameraRig.from_state_dict(state)
    assert copy.params == rig.params
    np.testing.assert_array_equal(copy.pose, rig.pose)
    np.testing.assert_array_equal(copy.step(frozenset("i")), rig.step(frozenset("i")))


def test_unknown_live_key_raises():
    with pytest.raises(ValueError, match="unknown keys"):
        CameraRig().step(frozenset({"q"}))


def test_intrinsics_for():
    fx = 640.0 / math.tan(math.radians(30.0))  # 1280 px wide, 60 deg horizontal FOV
    np.testing.assert_allclose(intrinsics_for(1280, 704), [fx, fx, 640.0, 352.0], rtol=1e-12)
    np.testing.assert_allclose(intrinsics_for(100, 50, fov_deg=90.0), [50.0, 50.0, 50.0, 25.0], rtol=1e-12)
