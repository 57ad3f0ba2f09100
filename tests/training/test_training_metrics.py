"""Evaluation helpers: phase_correlation (sign convention, sub-pixel accuracy on known shifts) and the contact sheet."""

from __future__ import annotations

import numpy as np
import pytest

from world_model.training.metrics import phase_correlation
from world_model.training.scenes import periodic_noise


@pytest.mark.parametrize("shift", [(3, -5), (-7, 2), (0, 11)])
def test_integer_roll_is_recovered_with_its_sign(shift):
    image = periodic_noise(np.random.default_rng(0), 128, slope=1.5, channels=3)
    moved = np.roll(image, shift, axis=(0, 1))  # content moves down by dy and right by dx
    dy, dx = phase_correlation(image, moved)
    assert dy == pytest.approx(shift[0], abs=0.05) and dx == pytest.approx(shift[1], abs=0.05)


def test_subpixel_shift():
    rng = np.random.default_rng(1)
    image = periodic_noise(rng, 128, slope=2.0)[..., 0]
    fy, fx = np.fft.fftfreq(128)[:, None], np.fft.fftfreq(128)[None, :]
    moved = np.fft.ifft2(np.fft.fft2(image) * np.exp(-2j * np.pi * (fy * 1.5 + fx * -2.25))).real
    dy, dx = phase_correlation(image, moved)
    assert dy == pytest.approx(1.5, abs=0.2) and dx == pytest.approx(-2.25, abs=0.2)


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="same size"):
        phase_correlation(np.zeros((8, 8)), np.zeros((8, 9)))


def test_contact_sheet_tiles_the_frames_at_the_given_times():
    from world_model.training.evaluate import contact_sheet

    fps, frames = 4, 20  # 5 s; frame i is filled with the value i
    video = np.broadcast_to(np.arange(frames, dtype=np.uint8)[:, None, None, None], (frames, 2, 3, 3)).copy()
    sheet = contact_sheet(video, fps, seconds=(0, 1, 2.5, 99), columns=3)
    assert sheet.shape == (2 * 2, 3 * 3, 3)
    tiles = [sheet[r * 2, c * 3, 0] for r in range(2) for c in range(3)]
    assert tiles == [0, 4, 10, frames - 1, 0, 0]  # 2.5 s -> frame 10; past the end -> the last frame; then padding
