"""Clips and shards: determinism, clip length, action coverage and the shard round trip."""

from __future__ import annotations

import numpy as np
import pytest

from world_model.controls import intrinsics_for, parse_actions, trajectory
from world_model.training.dataset import (
    actions_to_script,
    clip_script,
    random_script,
    read_shard,
    render_clip,
    write_shard,
)

SMALL = dict(frames=9, width=64, height=36)


def test_render_clip_is_deterministic_per_seed():
    video, poses, actions = render_clip(5, **SMALL)
    again, poses_again, actions_again = render_clip(5, **SMALL)
    assert video.shape == (9, 36, 64, 3) and video.dtype == np.uint8
    assert poses.shape == (9, 4, 4) and poses.dtype == np.float64 and len(actions) == 8
    np.testing.assert_array_equal(video, again)
    np.testing.assert_array_equal(poses, poses_again)
    assert actions == actions_again
    np.testing.assert_array_equal(poses[0], np.eye(4))


def test_clips_differ_between_seeds():
    a, _, _ = render_clip(5, **SMALL)
    b, _, _ = render_clip(6, **SMALL)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5.0


def test_poses_follow_the_actions():
    _, poses, actions = render_clip(11, **SMALL)
    np.testing.assert_array_equal(trajectory(actions_to_script(actions), 9), poses)


def test_clip_length_must_be_8k_plus_1():
    with pytest.raises(ValueError, match="8k \\+ 1"):
        render_clip(0, frames=48, width=32, height=18)


def test_random_scripts_have_the_exact_length_and_cover_every_key():
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    for _ in range(50):
        steps = parse_actions(random_script(rng, 96))
        assert len(steps) == 96
        seen |= set().union(*steps)
    assert seen == set("wasdijkl")
    assert clip_script(3, 97) == clip_script(3, 97)


def test_actions_to_script_round_trip():
    actions = ["w", "w", "", "", "dw", "i"]
    script = actions_to_script(actions)
    assert script == "w-2, none-2, dw-1, i-1"
    assert ["".join(sorted(keys)) for keys in parse_actions(script)] == actions


def test_shard_round_trip(tmp_path):
    path = write_shard(tmp_path / "shard-000.npz", [5, 6], **SMALL)
    shard = read_shard(path)
    assert shard.frames.shape == (2, 9, 36, 64, 3) and shard.frames.dtype == np.uint8
    assert shard.poses.dtype == np.float32 and shard.seeds.tolist() == [5, 6]
    np.testing.assert_allclose(shard.intrinsics, intrinsics_for(64, 36, 60.0), rtol=1e-6)
    video, poses, actions = render_clip(6, **SMALL)
    np.testing.assert_array_equal(shard.frames[1], video)
    np.testing.assert_allclose(shard.poses[1], poses, atol=1e-6)
    assert shard.scripts[1] == actions_to_script(actions)
    np.testing.assert_allclose(trajectory(shard.scripts[0], 9), shard.poses[0], atol=1e-6)
