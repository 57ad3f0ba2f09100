"""``sana-wm-stream bench``: chunk time per batch size, sessions at real time, state and memory.

Drives the engine directly (no network) with every session steered along its own path, as the server
would: ``warmup`` chunks first (the first chunk of a session is larger and, on a GPU, pays for kernel
selection), then ``chunks`` timed steady-state steps in which all sessions advance together. Each step is
timed up to its frames (``engine.step``) and with the work after them (``engine.settle``, the state write).

The latency the scheduler achieves at the largest real-time load comes from the scheduler itself run on a
simulated clock with the measured step times (:mod:`stream_server.simulation`; the server's default margin and
busy share): input -> frame on screen, leaving out encoding, network and the browser's jitter buffer.
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

from .config import ServerConfig
from .scheduler import Scheduler, StepTimeEstimator
from .simulation import simulate, staggered

KEYS = (["w"], ["w", "d"], ["a"], ["s", "i"], ["j"], ["l", "k"])


@dataclass
class BatchTiming:
    sessions: int
    chunk_ms_p50: float  # the whole step: up to the frames and the settle phase after them
    chunk_ms_p95: float
    realtime_factor: float  # seconds of video per wall second, all sessions together
    frames_ms_p50: float  # the step up to its frames (engine.step alone)
    settle_ms_p50: float  # the work after the frames (engine.settle)


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
    # input -> frame the scheduler achieves with max_realtime_sessions sessions (simulated on the measured times)
    latency_sessions: int
    input_to_frame_ms_p50: float | None
    input_to_frame_ms_p95: float | None

    def table(self) -> str:
        rows = [f"{self.model} on {self.device} ({self.dtype}), {self.width}x{self.height}"]
        rows.append("sessions  chunk p50 ms  chunk p95 ms  x real time  frames out p50 ms  settle p50 ms")
        for b in self.batches:
            rows.append(f"{b.sessions:8d}  {b.chunk_ms_p50:12.1f}  {b.chunk_ms_p95:12.1f}  {b.realtime_factor:11.2f}"
                        f"  {b.frames_ms_p50:17.1f}  {b.settle_ms_p50:13.1f}")
        rows.append(f"max sessions at real time: {self.max_realtime_sessions}")
        if self.input_to_frame_ms_p50 is not None:
            rows.append(f"input -> frame at {self.latency_sessions} sessions (scheduler, simulated on these times): "
                        f"p50 {self.input_to_frame_ms_p50:.0f} ms, p95 {self.input_to_frame_ms_p95:.0f} ms")
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
        samples = [_timed(engine, steer()) for _ in range(chunks)]
        times = sorted(frames + settle for frames, settle in samples)
        p50 = statistics.median(times)
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        frames_p50 = statistics.median(frames for frames, _ in samples)
        settle_p50 = statistics.median(settle for _, settle in samples)
        timings.append(BatchTiming(batch, p50, p95, batch * chunk_s * 1000.0 / p50, frames_p50, settle_p50))
        state_bytes = engine.state_bytes(ids[0])
        for sid in ids:
            engine.close_session(sid)

    sid = engine.open_session(prompt="benchmark scene", seed=0)  # a newcomer's first chunk, warm engine
    rig = CameraRig()
    first_ms = sum(_timed(engine, [ChunkRequest(sid, np.stack([rig.step(["w"]) for _ in range(info.chunk_pixel_frames)]))]))
    engine.close_session(sid)

    last = timings[-1]
    realtime = max((t.sessions for t in timings if t.chunk_ms_p50 <= chunk_s * 1000.0), default=0)
    latency = scheduled_latency(timings, realtime, chunk_s) if realtime else None
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
        max_realtime_sessions=realtime,
        first_chunk_ms=first_ms,
        state_bytes_per_session=state_bytes,
        peak_memory_bytes=_peak_memory(engine),
        batches=timings,
        latency_sessions=realtime,
        input_to_frame_ms_p50=None if latency is None else 1000.0 * latency[0],
        input_to_frame_ms_p95=None if latency is None else 1000.0 * latency[1],
    )


def scheduled_latency(timings: list[BatchTiming], sessions: int, chunk_seconds: float, seconds: float = 70.0) -> tuple[float, float]:
    """p50 and p95 input -> frame (seconds) of ``sessions`` viewers joining one by one, when the server's scheduler
    (default settings) plans steps that cost what was measured (sizes in between on the line through them)."""
    frames, settle = StepTimeEstimator(0.0), StepTimeEstimator(0.0)
    for t in timings:
        frames.record(t.sessions, t.frames_ms_p50 / 1000.0)
        settle.record(t.sessions, t.settle_ms_p50 / 1000.0)
    defaults = ServerConfig()
    sched = Scheduler(chunk_seconds=chunk_seconds, max_batch=sessions, margin_seconds=defaults.jit_margin,
                      estimator=StepTimeEstimator(defaults.step_prior), max_busy=defaults.max_engine_busy)
    run = simulate(sched, frames.mean, seconds, staggered(sessions, chunk_seconds), settle=settle.mean)
    return run.input_latency(10.0, seconds - 2 * chunk_seconds)


def _timed(engine: Engine, requests: list[ChunkRequest]) -> tuple[float, float]:
    """Wall milliseconds of one engine step up to its frames, and of its settle phase (the GPU drained between)."""
    _sync(engine)
    start = time.perf_counter()
    engine.step(requests)
    _sync(engine)
    frames = time.perf_counter()
    engine.settle()
    _sync(engine)
    return (frames - start) * 1000.0, (time.perf_counter() - frames) * 1000.0


def _peak_memory(engine: Engine) -> int:
    if engine.info.device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def as_json(result: BenchResult) -> dict:
    return asdict(result)
