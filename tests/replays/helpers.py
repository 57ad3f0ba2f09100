"""Shared pieces of the replay tests: synthetic recordings of the tiny model's geometry, a stand-in refiner,
and an MP4 frame counter. Used only by tests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from stream_server.jobs import JobQueue
from stream_server.recording import RecordingStore, SessionRecording, token_hash

WIDTH, HEIGHT, FPS = 256, 128, 16  # the tiny model's video
CHANNELS, LATENT_H, LATENT_W = 16, HEIGHT // 32, WIDTH // 32  # its latents
CHUNK_FRAMES = 24  # video frames per chunk (chunk 0: 4 latents incl. the start frame; later chunks: 3)


def identity_refine(latents: torch.Tensor, prompt, *, seed: int = 0, start_frame: int = 0,
                    refined_prefix: torch.Tensor | None = None, progress=None, delay: float = 0.0,
                    pace=None) -> Iterator[torch.Tensor]:
    """A stand-in refiner: yields the latents unchanged in blocks (frames 0-3, then threes) from ``start_frame``,
    calling ``pace()`` once before each block after the first (standing in for its forwards)."""
    assert refined_prefix is None or refined_prefix.shape[2] == start_frame
    frame = start_frame
    while frame < latents.shape[2]:
        end = 4 if frame == 0 else frame + 3
        if pace is not None and frame > 0:
            pace()
        time.sleep(delay)
        yield latents[:, :, frame:end].clone()
        frame = min(end, latents.shape[2])


def recording_meta(session_id: str, token: str, model: str = "tiny") -> dict:
    """``meta.json`` of a recording of the tiny model's geometry (under the name ``model``), as the recorder starts it."""
    return {"session_id": session_id, "token_sha256": token_hash(token), "model": model, "width": WIDTH,
            "height": HEIGHT, "fps": FPS, "seed": 0, "created_at": time.time(), "ended_at": None,
            "latents": {"file": "latents.f16", "dtype": "float16", "layout": "T,C,h,w", "channels": CHANNELS,
                        "height": LATENT_H, "width": LATENT_W, "frames": None}, "preview": None}


async def record_chunks(recording: SessionRecording, chunks: int, *, frames: int = CHUNK_FRAMES, latents: int = 3,
                        prompts: dict[int, str] | None = None) -> None:
    """Add ``chunks`` chunks of ``frames`` grey frames and random latents (chunk 0: 1 + ``latents``, later chunks
    ``latents``); ``prompts``: {chunk: the prompt that took effect there}, chunk 0's by default "a harbour"."""
    rng = np.random.default_rng(0)
    prompts = prompts or {0: "a harbour"}
    for c in range(chunks):
        video = np.full((frames, HEIGHT, WIDTH, 3), 20 * c % 256, np.uint8)
        z = rng.standard_normal((CHANNELS, latents + (c == 0), LATENT_H, LATENT_W)).astype(np.float16)
        line = {"chunk": c, "first_frame": c * frames, "frames": frames, **({"prompt": prompts[c]} if c in prompts else {})}
        await recording.add(video, z, np.tile(np.eye(4), (frames, 1, 1)), line)


def write_recording(data_dir: Path, session_id: str, token: str, *, chunks: int = 2, prompt: str = "a harbour",
                    ended_at: float | None = None, enqueue: bool = True, prompts: dict[int, str] | None = None,
                    frames: int = CHUNK_FRAMES, latents: int = 3, model: str = "tiny") -> RecordingStore:
    """A closed recording as the server leaves it (random latents, grey frames), queued for refinement."""
    store = RecordingStore(data_dir)

    async def record() -> None:
        recording = SessionRecording(store.folder(session_id), recording_meta(session_id, token, model), None)
        await record_chunks(recording, chunks, frames=frames, latents=latents, prompts=prompts or {0: prompt})
        await recording.close({"ended_at": ended_at if ended_at is not None else time.time(), "end_reason": "deleted"})

    asyncio.run(record())
    if enqueue:
        JobQueue(data_dir).enqueue(session_id)
    return store


def count_frames(path: Path | bytes) -> int:
    """Decoded video frames of an MP4 (a path or its bytes)."""
    import io

    source = io.BytesIO(path) if isinstance(path, bytes) else str(path)
    with av.open(source) as container:
        return sum(1 for _ in container.decode(video=0))
