"""Camera controls: the action-script DSL and the live key/mouse rig share one set of dynamics.

This follows the camera control of the current NVlabs SANA-WM release (``inference_video_scripts/wm/
camera_control.py`` and ``action_string_to_c2w``); sana-wm.md C.4 describes the same scheme.

Keys (DSL letters; a live client maps its physical keys onto them, e.g. arrows -> i/k/j/l)::

    w / s   move forward / back          a / d   yaw left / right
    i / k   pitch up / down              j / l   strafe left / right

Poses are OpenCV camera-to-world matrices (+X right, +Y down, +Z forward) and start at the identity.
Yaw turns about the world Y axis and pitch about the camera's own X axis, so the pose rotation is
``rot_y(yaw) @ rot_x(pitch)``: ``d`` turns the view toward +X, ``i`` tilts it toward -Y (up).
Translation moves along the camera's forward / right axes projected onto the horizontal XZ plane, so
looking up or down never makes the camera climb or sink.

Velocity model, one update per pixel frame (``dt = 1 / fps``), done before the pose is advanced:

* if any key is down this frame that was not down the frame before, every axis of the velocity jumps
  straight to its target (this also stops an axis that was still coasting);
* otherwise each axis moves toward its target by ``1 - exp(-dt / tau)`` of the remaining gap, with
  ``tau = tau_held`` when the axis's target is non-zero and ``tau = tau_coast`` when it is zero.

Notes where the NVlabs code is more specific than (or differs from) the prose description, followed here:

* the choice of ``tau`` looks at the axis's *target*, not at whether a key of the axis is held; holding
  both keys of an axis (``ws``) gives a zero target, but reaching that state is always a fresh press
  that snaps the axis to 0, so the two readings never differ in practice;
* the snap on a new key press resets *all* axes, not only the axis of the new key;
* pitch saturates: the step is cut so pitch lands exactly on the limit (the frame is kept, not dropped),
  and the pitch velocity itself is not reset by the limit;
* the projected forward / right axes are divided by ``norm + 1e-6``, so a step is ``1e-6`` relative
  shorter than the nominal speed; we keep that so trajectories match the release.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

KEYS = frozenset("wasdijkl")
_NORM_EPS = 1e-6  # the release divides projected axes by (norm + 1e-6); kept for parity
_ZERO_TARGET = 1e-12  # a target at most this large counts as zero (coasting) when picking tau


@dataclass(frozen=True)
class CameraParams:
    """Speeds and smoothing of the camera; all rates are per pixel frame."""

    translation_speed: float = 0.025  # world units moved per frame at full speed (w/s/j/l)
    rotation_speed_deg: float = 0.6  # degrees turned per frame at full speed (a/d/i/k)
    pitch_limit_deg: float = 60.0  # pitch saturates at +/- this many degrees
    fps: float = 16.0  # pixel frames per second; sets dt = 1 / fps for the smoothing
    tau_held: float = 0.45  # seconds; relaxation time constant toward a non-zero target
    tau_coast: float = 1.0  # seconds; relaxation time constant toward a zero target (coasting)

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.tau_held <= 0 or self.tau_coast <= 0:
            raise ValueError("fps, tau_held and tau_coast must be positive")
        if self.pitch_limit_deg < 0:
            raise ValueError("pitch_limit_deg must be non-negative")

    @property
    def rotation_speed_rad(self) -> float:
        return math.radians(self.rotation_speed_deg)


def parse_actions(script: str) -> list[frozenset[str]]:
    """Expand a script such as ``"w-10, iw-5，none-3"`` into one key set per pixel frame.

    Segments are ``<keys>-<frames>`` separated by ``,`` or the full-width ``，``; all whitespace is
    ignored and letters are case-insensitive. ``none`` (or, as in the release, an empty key part) means
    no key held. Raises ``ValueError`` for an empty script, a malformed segment, a non-positive frame
    count or an unknown key.
    """
    cleaned = "".join(script.replace("，", ",").split())
    if not cleaned:
        raise ValueError("action script is empty")
    frames: list[frozenset[str]] = []
    for segment in cleaned.split(","):
        if "-" not in segment:
            raise ValueError(f"bad action segment {segment!r}: expected '<keys>-<frames>'")
        keys_part, count_part = segment.rsplit("-", 1)
        if not count_part.isdecimal() or int(count_part) <= 0:
            raise ValueError(f"action segment {segment!r}: frame count {count_part!r} is not a positive integer")
        keys_part = keys_part.lower()
        if keys_part == "none":
            keys: frozenset[str] = frozenset()
        else:
            unknown = sorted(set(keys_part) - KEYS)
            if unknown:
                allowed = "".join(sorted(KEYS))
                raise ValueError(f"action segment {segment!r}: unknown keys {unknown}; allowed: {allowed}")
            keys = frozenset(keys_part)
        frames.extend([keys] * int(count_part))
    return frames


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _horizontal(axis: np.ndarray) -> np.ndarray:
    """``axis`` with its Y component dropped, scaled to (almost) unit length as the release does."""
    flat = np.array([axis[0], 0.0, axis[2]])
    norm = float(np.linalg.norm(flat))
    return flat / (norm + _NORM_EPS) if norm > 0 else flat


def _axis(keys: frozenset[str], positive: str, negative: str) -> float:
    return float(positive in keys) - float(negative in keys)


class CameraRig:
    """A camera driven one pixel frame at a time by held keys and mouse motion.

    State: the position, yaw and pitch (radians) of the camera, the smoothed per-frame velocity of the
    four axes (forward, strafe-right, yaw-right, pitch-up) and the keys held on the previous frame. The
    rotation is rebuilt from yaw and pitch each frame (the release multiplies small rotations onto the
    previous matrix; the product is the same, without rounding drift over long sessions), and yaw is
    kept in ``[-pi, pi]``.

    Long sessions: rotation state stays bounded, but the position grows without limit while the camera
    moves, costing float precision after hours. Call :meth:`rebase` now and then (e.g. whenever a pose
    is handed to the model relative to an earlier frame anyway) to move the origin to the camera.
    """

    def __init__(self, params: CameraParams = CameraParams()) -> None:
        self.params = params
        self.position = np.zeros(3)
        self.yaw = 0.0
        self.pitch = 0.0
        self.velocity = {"forward": 0.0, "strafe": 0.0, "yaw": 0.0, "pitch": 0.0}
        self.last_keys: frozenset[str] = frozenset()

    @property
    def rotation(self) -> np.ndarray:
        return _rot_y(self.yaw) @ _rot_x(self.pitch)

    @property
    def pose(self) -> np.ndarray:
        """The current 4x4 float64 camera-to-world matrix (a fresh copy)."""
        out = np.eye(4)
        out[:3, :3] = self.rotation
        out[:3, 3] = self.position
        return out

    def _target(self, keys: frozenset[str]) -> dict[str, float]:
        p = self.params
        return {
            "forward": _axis(keys, "w", "s") * p.translation_speed,
            "strafe": _axis(keys, "l", "j") * p.translation_speed,
            "yaw": _axis(keys, "d", "a") * p.rotation_speed_rad,
            "pitch": _axis(keys, "i", "k") * p.rotation_speed_rad,
        }

    def step(self, keys: Iterable[str], mouse_dx: float = 0.0, mouse_dy: float = 0.0) -> np.ndarray:
        """Advance one pixel frame with ``keys`` held and return the new 4x4 camera-to-world pose.

        ``mouse_dx`` / ``mouse_dy`` are in rotation steps: 1.0 turns as far as one frame of a held yaw /
        pitch key at full speed. Positive dx turns right (like ``d``) and positive dy looks up (like
        ``i``; negate a screen-space mouse delta). Mouse motion is applied to that frame only, bypasses
        the smoothing, and pitch stays within the limit.
        """
        keys = frozenset(keys)
        unknown = keys - KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {''.join(sorted(KEYS))}")
        p = self.params
        target = self._target(keys)
        if keys - self.last_keys:  # a fresh press: take effect at once, on every axis
            self.velocity = dict(target)
        else:
            dt = 1.0 / p.fps
            for name, goal in target.items():
                tau = p.tau_held if abs(goal) > _ZERO_TARGET else p.tau_coast
                self.velocity[name] += (1.0 - math.exp(-dt / tau)) * (goal - self.velocity[name])
        self.last_keys = keys

        v = self.velocity
        limit = math.radians(p.pitch_limit_deg)
        self.pitch = min(limit, max(-limit, self.pitch + v["pitch"] + mouse_dy * p.rotation_speed_rad))
        self.yaw = math.remainder(self.yaw + v["yaw"] + mouse_dx * p.rotation_speed_rad, 2.0 * math.pi)
        rotation = self.rotation
        self.position = (
            self.position + _horizontal(rotation[:, 2]) * v["forward"] + _horizontal(rotation[:, 0]) * v["strafe"]
        )
        return self.pose

    def rebase(self) -> np.ndarray:
        """Move the world origin to the camera's position and return the 4x4 transform ``T`` applied.

        Every pose before the call maps to the new frame as ``T @ pose``; only a translation is removed,
        so the world axes (and with them the horizontal plane and yaw / pitch) are unchanged and the
        motion between frames is exactly the same as without the rebase.
        """
        transform = np.eye(4)
        transform[:3, 3] = -self.position
        self.position = np.zeros(3)
        return transform

    def state_dict(self) -> dict[str, Any]:
        """The rig as plain floats, lists and strings (JSON-serialisable)."""
        return {
            "params": asdict(self.params),
            "position": [float(x) for x in self.position],
            "yaw": self.yaw,
            "pitch": self.pitch,
            "velocity": dict(self.velocity),
            "last_keys": sorted(self.last_keys),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CameraRig:
        """Rebuild a rig saved with :meth:`state_dict`."""
        rig = cls(CameraParams(**state["params"]))
        rig.position = np.array(state["position"], dtype=np.float64)
        rig.yaw = float(state["yaw"])
        rig.pitch = float(state["pitch"])
        rig.velocity = {name: float(state["velocity"][name]) for name in rig.velocity}
        rig.last_keys = frozenset(state["last_keys"])
        return rig


def trajectory(script: str, frames: int | None = None, params: CameraParams = CameraParams()) -> np.ndarray:
    """Roll ``script`` out into ``(N + 1, 4, 4)`` float64 camera-to-world poses, the first the identity.

    With ``frames`` the result has exactly ``frames`` poses: the last segment's keys stay held for as
    long as needed, or the rollout is cut short. (The release returns float32; the caller casts.)
    """
    per_frame = parse_actions(script)
    if frames is not None:
        if frames < 1:
            raise ValueError(f"frames must be at least 1; got {frames}")
        per_frame = per_frame[: frames - 1] + [per_frame[-1]] * max(0, frames - 1 - len(per_frame))
    rig = CameraRig(params)
    poses = [rig.pose] + [rig.step(keys) for keys in per_frame]
    return np.stack(poses)


def intrinsics_for(width: int, height: int, fov_deg: float = 60.0) -> np.ndarray:
    """Pinhole ``[fx, fy, cx, cy]`` in pixels for a horizontal field of view, square pixels, centred.

    The 60 degree default is a middle-of-the-road guess for ordinary footage; the release has no default
    (it estimates intrinsics from the first frame with Pi3X and rejects FOVs outside 25..120 degrees),
    so pass the real FOV when it is known.
    """
    if width <= 0 or height <= 0 or not 0.0 < fov_deg < 180.0:
        raise ValueError(f"need positive width/height and 0 < fov_deg < 180; got {width}x{height}, {fov_deg}")
    focal = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([focal, focal, width / 2.0, height / 2.0])
