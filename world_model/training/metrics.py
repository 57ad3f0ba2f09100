"""Image-motion measurements used to check that rendered (and later generated) video answers the camera."""

from __future__ import annotations

import numpy as np


def _grey(image: np.ndarray) -> np.ndarray:
    """A float64 ``(H, W)`` luminance of an ``(H, W)`` or ``(H, W, C)`` image, mean removed."""
    image = np.asarray(image, np.float64)
    if image.ndim == 3:
        image = image.mean(axis=-1)
    if image.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) image; got shape {image.shape}")
    return image - image.mean()


def _parabolic_offset(left: float, centre: float, right: float) -> float:
    """Sub-sample offset of a peak from three samples around it (vertex of the fitted parabola)."""
    denom = left - 2.0 * centre + right
    return 0.0 if denom == 0.0 else 0.5 * (left - right) / denom


def phase_correlation(a: np.ndarray, b: np.ndarray, smoothing: float = 1.0) -> tuple[float, float]:
    """The global translation ``(dy, dx)`` in pixels that carries image ``a`` onto ``b``.

    That is ``b(y, x) ~ a(y - dy, x - dx)``: content that moves right between ``a`` and ``b`` gives
    ``dx > 0``, content that moves down ``dy > 0``. Both images are greyscale-converted and Hann-windowed
    (so the image borders do not dominate). The normalised cross-power spectrum is tapered by a Gaussian,
    i.e. the correlation surface is blurred by ``smoothing`` pixels: that keeps a lone spurious peak from
    periodic texture (a checker near the horizon) from beating the broad true one. The peak is refined to
    sub-pixel precision with a parabola along each axis; shifts wrap at half the image size.
    """
    ga, gb = _grey(a), _grey(b)
    if ga.shape != gb.shape:
        raise ValueError(f"images must have the same size; got {ga.shape} and {gb.shape}")
    height, width = ga.shape
    window = np.hanning(height)[:, None] * np.hanning(width)[None, :]
    cross = np.fft.fft2(gb * window) * np.conj(np.fft.fft2(ga * window))
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    taper = np.exp(-2.0 * np.pi**2 * smoothing**2 * (fy**2 + fx**2))
    surface = np.fft.ifft2(cross / (np.abs(cross) + 1e-12) * taper).real
    py, px = np.unravel_index(int(np.argmax(surface)), surface.shape)
    dy = py + _parabolic_offset(surface[py - 1, px], surface[py, px], surface[(py + 1) % height, px])
    dx = px + _parabolic_offset(surface[py, px - 1], surface[py, px], surface[py, (px + 1) % width])
    return float((dy + height / 2) % height - height / 2), float((dx + width / 2) % width - width / 2)
