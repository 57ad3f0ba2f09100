"""A test double of :class:`world_model.engine_api.Engine`: tiny frames whose brightness shows the camera.

Each frame is one flat grey level: ``BASE + GAIN * z`` (clipped), ``z`` being the camera's forward
position in its pose, so a test that holds ``w`` sees the picture brighten after the input took effect,
even through a lossy video codec. Steps can be made slow to exercise the scheduler. Used only by tests.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np

from world_model.engine_api import ChunkRequest, ChunkResult, EngineError, EngineInfo

BASE = 40.0  # grey level at the start pose
GAIN = 150.0  # grey levels per world unit moved forward


def brightness_for(z: float) -> float:
    return float(np.clip(BASE + GAIN * z, 0, 255))


class FakeEngine:
    def __init__(self, *, width: int = 64, height: int = 48, fps: int = 16, chunk_frames: int = 8,
                 step_seconds: float = 0.0, per_session_seconds: float = 0.0) -> None:
        self.info = EngineInfo(model="fake", width=width, height=height, fps=fps, chunk_latent_frames=1,
                               chunk_pixel_frames=chunk_frames, device="cpu", dtype="fp32")
        self.step_seconds = step_seconds  # fixed cost of a step
        self.per_session_seconds = per_session_seconds  # extra cost per session in the batch
        self.sessions: dict[str, dict] = {}
        self.batches: list[tuple[str, ...]] = []  # session ids of every step, in order
        self.settles: list[int] = []  # steps run before each settle() call
        self.fail_next_step = False
        self._next_id = 0
        self._thread: int | None = None  # all calls must come from one thread
        self._lock = threading.Lock()

    def _check_thread(self) -> None:
        ident = threading.get_ident()
        assert self._thread in (None, ident), "engine called from two threads"
        self._thread = ident
        assert self._lock.acquire(blocking=False), "engine calls overlap"
        self._lock.release()

    def open_session(self, *, prompt: str, image: np.ndarray | None = None, seed: int = 0) -> str:
        self._check_thread()
        if image is not None and (image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8):
            raise EngineError(f"image must be (H, W, 3) uint8; got {image.shape} {image.dtype}")
        self._next_id += 1
        sid = f"fake-{self._next_id}"
        self.sessions[sid] = {"prompt": prompt, "seed": seed, "image": image, "frames": 0, "prompts": [prompt]}
        return sid

    def set_prompt(self, session_id: str, prompt: str) -> None:
        self._check_thread()
        self._session(session_id)["prompts"].append(prompt)

    def close_session(self, session_id: str) -> None:
        self._check_thread()
        self.sessions.pop(session_id, None)

    def state_bytes(self, session_id: str) -> int:
        self._check_thread()
        return 1000 + self._session(session_id)["frames"]

    def _session(self, session_id: str) -> dict:
        if session_id not in self.sessions:
            raise EngineError(f"unknown session {session_id!r}")
        return self.sessions[session_id]

    def settle(self) -> None:
        self._check_thread()
        self.settles.append(len(self.batches))  # how many steps had run when it was called

    def step(self, requests: Sequence[ChunkRequest]) -> list[ChunkResult]:
        self._check_thread()
        with self._lock:
            if self.fail_next_step:
                self.fail_next_step = False
                raise RuntimeError("injected failure")
            time.sleep(self.step_seconds + self.per_session_seconds * len(requests))
            self.batches.append(tuple(r.session_id for r in requests))
            results = []
            n = self.info.chunk_pixel_frames
            for request in requests:
                state = self._session(request.session_id)
                if request.poses.shape != (n, 4, 4):
                    raise EngineError(f"poses must be ({n}, 4, 4); got {request.poses.shape}")
                frames = np.empty((n, self.info.height, self.info.width, 3), dtype=np.uint8)
                for i, pose in enumerate(request.poses):
                    frames[i] = round(brightness_for(float(pose[2, 3])))
                chunk_index = 0 if state["frames"] == 0 else state["frames"] // n
                results.append(ChunkResult(request.session_id, chunk_index, state["frames"], frames))
                state["frames"] += n
            return results
