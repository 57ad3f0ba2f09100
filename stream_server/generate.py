"""``sana-wm-stream generate``: image + prompt + action script -> an MP4, chunk by chunk through the engine."""

from __future__ import annotations

import math
import queue
import sys
import threading
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

    Steps:
      1. roll the action script out into one camera pose per video frame;
      2. per chunk: one engine step, whose frames go to an encoder thread, so that encoding the chunk
         overlaps generating the next one (a queue of two chunks keeps memory flat however long the clip);
      3. flush the encoder and close the file.
    """
    info = engine.info
    frames = check_seconds(seconds, info.fps)
    per_chunk = info.chunk_pixel_frames
    chunks = math.ceil(frames / per_chunk)
    poses = trajectory(actions, chunks * per_chunk + 1)[1:]  # frame 0 is the start image at the identity
    sid = engine.open_session(prompt=prompt, image=image, seed=seed)
    encoder = _Encoder(out, info.width, info.height, info.fps)
    written, started = 0, time.perf_counter()
    try:
        for c in range(chunks):
            (result,) = engine.step([ChunkRequest(sid, poses[c * per_chunk : (c + 1) * per_chunk])])
            batch = result.frames[: frames - written]
            encoder.put(batch)
            written += len(batch)
            if progress:
                _progress(c + 1, chunks, written / info.fps, time.perf_counter() - started)
    finally:
        engine.close_session(sid)
        encoder.close()
        if progress:
            print(file=sys.stderr)
    return written


class _Encoder:
    """H.264 (x264, yuv420p) into an MP4 on its own thread, fed whole chunks through a bounded queue."""

    def __init__(self, out: Path, width: int, height: int, fps: int) -> None:
        import av

        self._container = av.open(str(out), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": "18", "preset": "fast"}
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="encoder", daemon=True)
        self._thread.start()

    def put(self, frames: np.ndarray) -> None:
        self._raise()
        self._queue.put(frames)

    def close(self) -> None:
        """Flush and close the file (also after a failure); re-raises an encoder error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _run(self) -> None:
        import av

        frames: np.ndarray | None = np.empty(0)
        try:
            while (frames := self._queue.get()) is not None:
                for rgb in frames:
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                    self._container.mux(self._stream.encode(frame))
            self._container.mux(self._stream.encode())
        except BaseException as exc:  # handed to the generating thread
            self._error = exc
            while frames is not None:  # drain up to the end marker so the producer never blocks
                frames = self._queue.get()
        finally:
            self._container.close()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _progress(done: int, total: int, video_s: float, wall_s: float) -> None:
    width = 30
    bar = "#" * (width * done // total) + "-" * (width - width * done // total)
    print(f"\r[{bar}] chunk {done}/{total}  {video_s:.1f} s of video in {wall_s:.1f} s ({video_s / max(wall_s, 1e-9):.2f}x real time)", end="", file=sys.stderr, flush=True)
