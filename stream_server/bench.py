"""``sana-wm-stream bench``: chunk time per batch size, sessions at real time, state and memory.

Drives the engine directly (no network) with every session steered along its own path, as the server
would: ``warmup`` chunks first (the first chunk of a session is larger and, on a GPU, pays for kernel
selection), then ``chunks`` timed steady-state steps in which all sessions advance together.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from world_model.controls import CameraRig
from world_model.engine_api import ChunkRequest, Engine

KEYS = (["w"], ["w", "d"], ["a"], ["s", "i"], ["j"], ["l", "k"])


@dataclass
class BatchTiming:
    sessions: int
    chunk_ms_p50: float
    chunk_ms_p95: float
    realtime_factor: float  # seconds of video per wall second, all sessions together


@dataclass
class BenchResult:
    """interface.md's ``bench --json`` keys (for the largest batch) plus every batch size measured."""

    model: str
    device: str
    dtype: str
    width: int
    height: int
    sessions: int
    chunk_ms_p50: float
    chunk_ms_p95: float
    realtime_factor: float
    max_realtime_sessions: int  # the largest measured batch whose chunk time is below the chunk's duration
    first_chunk_ms: float  # a new session's first chunk (4 latents) alone, warm engine
    state_bytes_per_session: int
    peak_memory_bytes: int
    batches: list[BatchTiming]

    def table(self) -> str:
        rows = [f"{self.model} on {self.device} ({self.dtype}), {self.width}x{self.height}"]
        rows.append("sessions  chunk p50 ms  chunk p95 ms  x real time")
        for b in self.batches:
            rows.append(f"{b.sessions:8d}  {b.chunk_ms_p50:12.1f}  {b.chunk_ms_p95:12.1f}  {b.realtime_factor:11.2f}")
        rows.append(f"max sessions at real time: {self.max_realtime_sessions}")
        rows.append(f"first chunk of a session: {self.first_chunk_ms:.1f} ms")
        rows.append(f"state per session: {self.state_bytes_per_session / 2**20:.2f} MiB; peak memory {self.peak_memory_bytes / 2**30:.2f} GiB")
        return "\n".join(rows)


def batch_sizes(sessions: int) -> list[int]:
    """1, 2, 4, ... up to ``sessions``, always ending with ``sessions``."""
    sizes = [1 << i for i in range(sessions.bit_length()) if 1 << i < sessions]
    return sizes + [sessions]


def _sync(engine: Engine) -> None:
    if engine.info.device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(engine: Engine, sizes: list[int], chunks: int = 5, warmup: int = 2) -> BenchResult:
    info = engine.info
    chunk_s = info.chunk_pixel_frames / info.fps
    timings, state_bytes = [], 0
    for batch in sizes:
        rigs = [CameraRig() for _ in range(batch)]
        ids = [engine.open_session(prompt=f"benchmark scene {i}", seed=i) for i in range(batch)]
        steer = lambda: [
            ChunkRequest(sid, np.stack([rig.step(KEYS[i % len(KEYS)]) for _ in range(info.chunk_pixel_frames)]))
            for i, (sid, rig) in enumerate(zip(ids, rigs))
        ]
        for _ in range(warmup):
            _timed(engine, steer())
        times = sorted(_timed(engine, steer()) for _ in range(chunks))
        p50 = statistics.median(times)
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        timings.append(BatchTiming(batch, p50, p95, batch * chunk_s * 1000.0 / p50))
        state_bytes = engine.state_bytes(ids[0])
        for sid in ids:
            engine.close_session(sid)

    sid = engine.open_session(prompt="benchmark scene", seed=0)  # a newcomer's first chunk, warm engine
    rig = CameraRig()
    first_ms = _timed(engine, [ChunkRequest(sid, np.stack([rig.step(["w"]) for _ in range(info.chunk_pixel_frames)]))])
    engine.close_session(sid)

    last = timings[-1]
    return BenchResult(
        model=info.model,
        device=info.device,
        dtype=info.dtype,
        width=info.width,
        height=info.height,
        sessions=last.sessions,
        chunk_ms_p50=last.chunk_ms_p50,
        chunk_ms_p95=last.chunk_ms_p95,
        realtime_factor=last.realtime_factor,
        max_realtime_sessions=max((t.sessions for t in timings if t.chunk_ms_p50 <= chunk_s * 1000.0), default=0),
        first_chunk_ms=first_ms,
        state_bytes_per_session=state_bytes,
        peak_memory_bytes=_peak_memory(engine),
        batches=timings,
    )


def _timed(engine: Engine, requests: list[ChunkRequest]) -> float:
    """Wall milliseconds of one engine step (the GPU drained before and after)."""
    _sync(engine)
    start = time.perf_counter()
    engine.step(requests)
    _sync(engine)
    return (time.perf_counter() - start) * 1000.0


def _peak_memory(engine: Engine) -> int:
    if engine.info.device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def as_json(result: BenchResult) -> dict:
    return asdict(result)
