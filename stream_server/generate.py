"""``sana-wm-stream generate``: image + prompt + action script -> an MP4, chunk by chunk through the engine."""

from __future__ import annotations

import math
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from world_model.controls import trajectory
from world_model.engine_api import ChunkRequest, Engine

MAX_SECONDS = 3600.0


def check_seconds(seconds: float, fps: int) -> int:
    """Frames to generate for ``seconds`` of video; ValueError outside (0, MAX_SECONDS]."""
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise ValueError(f"--seconds must be in (0, {MAX_SECONDS:g}]; got {seconds:g}")
    return max(1, round(seconds * fps))


def generate_video(engine: Engine, out: Path, *, prompt: str, actions: str, seconds: float, image: np.ndarray | None = None, seed: int = 0, progress: bool = True) -> int:
    """Stream ``seconds`` of video along ``actions`` into ``out`` (H.264 MP4); returns the frames written.

    Frames go to the encoder as each chunk is decoded, so memory stays flat however long the clip.
    """
    import av

    info = engine.info
    frames = check_seconds(seconds, info.fps)
    per_chunk = info.chunk_pixel_frames
    chunks = math.ceil(frames / per_chunk)
    poses = trajectory(actions, chunks * per_chunk + 1)[1:]  # frame 0 is the start image at the identity
    sid = engine.open_session(prompt=prompt, image=image, seed=seed)
    written, started = 0, time.perf_counter()
    try:
        with av.open(str(out), mode="w") as container:
            stream = container.add_stream("libx264", rate=Fraction(info.fps))
            stream.width, stream.height, stream.pix_fmt = info.width, info.height, "yuv420p"
            stream.options = {"crf": "18", "preset": "fast"}
            for c in range(chunks):
                (result,) = engine.step([ChunkRequest(sid, poses[c * per_chunk : (c + 1) * per_chunk])])
                for rgb in result.frames[: frames - written]:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
                    written += 1
                if progress:
                    _progress(c + 1, chunks, written / info.fps, time.perf_counter() - started)
            container.mux(stream.encode())
    finally:
        engine.close_session(sid)
        if progress:
            print(file=sys.stderr)
    return written


def _progress(done: int, total: int, video_s: float, wall_s: float) -> None:
    width = 30
    bar = "#" * (width * done // total) + "-" * (width - width * done // total)
    print(f"\r[{bar}] chunk {done}/{total}  {video_s:.1f} s of video in {wall_s:.1f} s ({video_s / max(wall_s, 1e-9):.2f}x real time)", end="", file=sys.stderr, flush=True)
