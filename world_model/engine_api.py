"""The narrow interface between the server and the world model.

Everything that crosses it is plain Python, numpy arrays and bytes: tensors stay on the engine's side.
A server (or ``generate``) drives an engine like this::

    sid = engine.open_session(prompt="a quiet harbour at dusk", image=rgb_uint8_or_None, seed=0)
    while running:
        poses = [rig.step(keys) for _ in range(engine.info.chunk_pixel_frames)]   # newest input
        (result,) = engine.step([ChunkRequest(sid, np.stack(poses))])
        show(result.frames)                                                         # (n, H, W, 3) uint8
        engine.settle()                          # the step's remaining work, while the frames play
    engine.close_session(sid)

``step`` advances every requested session by one chunk in one batched pass; sessions in their first chunk
may share a step with sessions far into theirs. Sessions join (``open_session``) and leave
(``close_session``) between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    model: str  # preset or checkpoint name
    width: int  # pixels of the decoded video
    height: int
    fps: int
    chunk_latent_frames: int  # latent frames per chunk after the first (1-3; the release uses 3)
    chunk_pixel_frames: int  # video frames every chunk emits (8 per latent; chunk 0 emits the same count)
    device: str
    dtype: str


@dataclass(frozen=True)
class ChunkRequest:
    """Advance ``session_id`` by one chunk along ``poses``.

    ``poses`` ``(chunk_pixel_frames, 4, 4)`` float: OpenCV camera-to-world of the chunk's new video
    frames, in the session's world frame (its start image is frame 0 at the identity). Build them with
    :class:`world_model.controls.CameraRig` from the newest input.
    """

    session_id: str
    poses: np.ndarray


@dataclass(frozen=True)
class ChunkResult:
    session_id: str
    chunk_index: int  # 0 for the first chunk of a session
    first_frame: int  # index (from 0) of frames[0] in the session's video; the start image is not emitted
    frames: np.ndarray  # (chunk_pixel_frames, height, width, 3) uint8 RGB
    latents: np.ndarray | None = None  # (C, T, h, w) float16 clean Stage-1 latents of the chunk (for recording)


class EngineError(ValueError):
    """A request the engine refuses (unknown session, wrong pose count, unreadable image, ...)."""


class Engine(Protocol):
    info: EngineInfo

    def open_session(self, *, prompt: str, image: np.ndarray | None = None, seed: int = 0) -> str:
        """Start a session from ``image`` ``(H, W, 3)`` uint8 RGB (any size: resized and centre-cropped;
        None: the model's default start image) and ``prompt``; returns its id. Nothing is generated yet."""
        ...

    def set_prompt(self, session_id: str, prompt: str) -> None:
        """Use ``prompt`` from the session's next chunk on."""
        ...

    def close_session(self, session_id: str) -> None:
        """Free the session; unknown ids are ignored."""
        ...

    def sessions(self) -> list[str]:
        """Ids of the open sessions."""
        ...

    def state_bytes(self, session_id: str) -> int:
        """Size of the session's recurrent state (DiT state + VAE decoder cache)."""
        ...

    def step(self, requests: Sequence[ChunkRequest]) -> list[ChunkResult]:
        """Generate one chunk for each request (distinct sessions) in one batched pass, in request order."""
        ...

    def settle(self) -> None:
        """Finish the work of the last step that its frames do not wait for (advancing the sessions' state).

        Optional for correctness (``step`` and the other calls settle first when needed); a server calls it
        after showing a step's frames, so that the next inputs wait only for the part the frames need."""
        ...
