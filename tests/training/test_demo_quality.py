"""The shipped demo model answers the camera, follows the world and stays alive (held-out renderer scenes).

Ground truth comes from the procedural renderer along the same key-driven trajectory
(``world_model.training.evaluate``). Motion is judged between frames one latent apart (8 frames, 0.5 s),
and, more loosely, between consecutive frames: the demo VAE's 16 latent channels carry little of the motion
between the 8 frames of a latent, and even its decoder, fine-tuned for those changes, gets only part of it
back from its own encoding of the ground truth (docs/demo-training/README.md). Every measure is checked
against the renderer as well, so a broken measure cannot pass.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from world_model.engine import build_engine
from world_model.training.evaluate import HELD_OUT_SEED, fidelity, long_session, motion, stability

SEEDS = (HELD_OUT_SEED, HELD_OUT_SEED + 2)
LATENT_GAP = 8  # pixel frames per latent frame


@pytest.fixture(scope="module")
def demo():
    return build_engine()  # the shipped trained weights


@pytest.fixture(scope="module")
def measured(demo):
    return motion(demo, SEEDS, chunks=2, gaps=(1, LATENT_GAP))


@pytest.fixture(scope="module")
def shares(measured):
    generated, rendered = measured
    return generated[LATENT_GAP], rendered[LATENT_GAP]


def test_the_motion_measure_reads_the_renderer_right(shares):
    _, rendered = shares
    assert min(rendered.values()) >= 0.9, rendered


def test_turning_moves_the_picture_the_right_way(shares):
    generated, _ = shares
    assert generated["a"] >= 0.9 and generated["d"] >= 0.9, generated  # yaw: horizontal motion
    assert generated["i"] >= 0.9 and generated["k"] >= 0.75, generated  # pitch: vertical motion


def test_walking_expands_and_contracts_the_picture(shares):
    generated, _ = shares
    assert generated["w"] >= 0.75 and generated["s"] >= 0.7, generated


def test_consecutive_frames_move_with_the_camera(measured):
    """Frame to frame, every key moves the picture the right way in most pairs, yaw left in nearly all. Measured
    on these seeds: 88 / 69 / 81 / 61 / 68 / 62% (a / d / i / k / w / s); the decoder before its fine-tune for
    frame-to-frame changes gave 47 / 73 / 74 / 50 / 53 / 54%; the renderer itself gives at least 90%."""
    generated, rendered = measured
    assert min(rendered[1].values()) >= 0.9, rendered[1]
    assert generated[1]["a"] >= 0.8 and min(generated[1].values()) >= 0.55, generated[1]


def test_random_weights_do_not_pass_the_motion_check():
    random = build_engine("demo", random_weights=True)
    generated, _ = motion(random, SEEDS[:1], chunks=2, gaps=(LATENT_GAP,))
    assert min(generated[LATENT_GAP].values()) < 0.9, generated


def test_the_video_follows_the_world_better_than_a_still_frame(demo):
    generated, repeat_first = fidelity(demo, SEEDS[:1], chunks=7)  # 10.5 s of a mixed path
    assert generated > repeat_first + 1.0, (generated, repeat_first)


def test_five_minutes_of_steering_neither_freeze_nor_blank(demo):
    """200 chunks (5 minutes) of keys: the last chunks still change from frame to frame, and every 15 s keeps
    spatial contrast far above a blank frame's (a flat frame has a spread of a few levels). The world itself
    drifts: after about a minute the picture loses its scene structure and its spread falls from ~58 to
    ~21 levels (docs/demo-training/README.md); this asserts only the absence of a frozen or blank picture."""
    measured = stability(long_session(demo, HELD_OUT_SEED, chunks=200), demo.info.fps, demo.info.chunk_pixel_frames)
    assert np.isfinite(list(measured.values())).all()
    assert measured["frame_diff_last"] > 0.3 * measured["frame_diff_first"] > 0, measured
    assert measured["spatial_std_last"] > 10.0 and measured["spatial_std_first"] > 30.0, measured
    spans = {k: v for k, v in measured.items() if re.fullmatch(r"spatial_std_\d+s", k)}
    assert len(spans) == 20 and min(spans.values()) > 10.0, spans  # 300 s in 15 s spans, none blank
