"""The engine loop: one per process, schedule -> execute -> deliver, with the model on its own thread.

Every engine call (open, close, set_prompt, step, state_bytes) runs on a single worker thread, so calls
never overlap and the event loop stays free to pace video and answer requests while a step runs.
The policy of what to step and when is :mod:`stream_server.scheduler`; this module only carries it out:

1. ask the scheduler for a plan; wait until its start time (or until a session joins or leaves);
2. for each session in the batch, roll its camera rig over the chunk's frames with the newest input
   (:meth:`Session.next_chunk_input`) and run ``set_prompt`` + ``step`` on the engine thread;
3. hand each chunk to its session's frame queue (and to ``on_chunk``, the recorder), record the step
   time;
4. let the engine finish the step's remaining work (``settle``: the state write the frames did not wait
   for), record its time, and go back to 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import numpy as np

from world_model.engine_api import ChunkRequest, ChunkResult, Engine, EngineError

from . import protocol
from .gate import GatePublisher
from .metrics import ServerMetrics
from .scheduler import Scheduler
from .sessions import ChunkInput, Session

log = logging.getLogger(__name__)


class EngineLoop:
    """Drives ``engine`` for all streaming sessions; see the module docstring."""

    def __init__(self, engine: Engine, scheduler: Scheduler, metrics: ServerMetrics, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.metrics = metrics
        self.clock = clock
        self.on_failure: Callable[[Session, str], Awaitable[None]] | None = None  # ends a session (set by the app)
        self.on_chunk: Callable[[Session, ChunkResult, ChunkInput], Awaitable[None]] | None = None  # the recorder
        self.gate: GatePublisher | None = None  # publishes the next live step's start for a refiner (set by the app)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._attached: dict[str, Session] = {}
        self._wake = asyncio.Event()
        self._frames_at_tick: dict[str, int] = {}

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the engine thread (after any step in progress)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def open_session(self, *, prompt: str, image: np.ndarray | None, seed: int) -> str:
        return await self.call(self.engine.open_session, prompt=prompt, image=image, seed=seed)

    async def close_session(self, engine_id: str) -> None:
        await self.call(self.engine.close_session, engine_id)

    def attach(self, session: Session) -> None:
        """Start generating for ``session``; frames still queued from before count as buffered."""
        self._attached[session.id] = session
        self.scheduler.add(session.id, self.clock(), buffered_seconds=len(session.frames) / self.engine.info.fps)
        self._wake.set()

    def detach(self, session: Session) -> None:
        if self._attached.pop(session.id, None) is not None:
            self.scheduler.remove(session.id)
            self._wake.set()

    async def run(self) -> None:
        """The loop itself; runs until cancelled."""
        while True:
            now = self.clock()
            plan = self.scheduler.plan(now)
            if self.gate is not None:  # tell a refiner sharing the device when the next live step starts
                self.gate.publish(None if plan is None else plan.start_at)
            if plan is None or plan.start_at > now:
                timeout = None if plan is None else plan.start_at - now
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            await self._step(plan.batch)

    def _execute(self, prompts: list[tuple[str, str]], requests: list[ChunkRequest]) -> list[ChunkResult]:
        """On the engine thread: new prompts, then one batched step."""
        for engine_id, prompt in prompts:
            self.engine.set_prompt(engine_id, prompt)
        return self.engine.step(requests)

    def _settle(self, engine_ids: list[str]) -> tuple[float, dict[str, int]]:
        """On the engine thread: the step's remaining work; its seconds and the state sizes of the sessions still open."""
        started = self.clock()
        self.engine.settle()
        seconds = self.clock() - started
        sizes = {}
        for eid in engine_ids:
            with contextlib.suppress(EngineError):  # closed while the step ran
                sizes[eid] = self.engine.state_bytes(eid)
        return seconds, sizes

    async def _step(self, batch: tuple[str, ...]) -> None:
        sessions = [self._attached[sid] for sid in batch]
        frames = self.engine.info.chunk_pixel_frames
        inputs: list[ChunkInput] = [s.next_chunk_input(frames) for s in sessions]
        requests = [ChunkRequest(s.engine_id, chunk.poses) for s, chunk in zip(sessions, inputs)]
        prompts = [(s.engine_id, chunk.prompt) for s, chunk in zip(sessions, inputs) if chunk.prompt is not None]
        self.scheduler.start(batch)
        started = self.clock()
        try:
            results = await self.call(self._execute, prompts, requests)
        except Exception:
            log.exception("engine step failed for %d sessions; ending them", len(sessions))
            self.scheduler.abort()
            await self._fail(sessions)
            return
        now = self.clock()
        late = self.scheduler.finish(batch, started, now)
        self.metrics.step_seconds.observe(now - started)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.late_chunks.inc(sum(late.values()))
        for session, chunk, result in zip(sessions, inputs, results):
            if self._attached.get(session.id) is not session:  # left while its step ran
                continue
            dropped = session.deliver(result, chunk)
            self.metrics.dropped_frames.inc(dropped)
            if self.on_chunk is not None:
                await self.on_chunk(session, result, chunk)
        try:
            seconds, sizes = await self.call(self._settle, [s.engine_id for s in sessions])
        except Exception:
            log.exception("engine settle failed after a step of %d sessions; ending them", len(sessions))
            await self._fail([s for s in sessions if self._attached.get(s.id) is s])
            return
        self.scheduler.settled(len(batch), seconds)
        for session in sessions:
            session.state_bytes = sizes.get(session.engine_id, session.state_bytes)

    async def _fail(self, sessions: list[Session]) -> None:
        self.metrics.step_errors.inc()
        for session in sessions:
            session.send(protocol.error_event("engine_error", "the world model failed; this session ends"))
            if self.on_failure is not None:
                await self.on_failure(session, "engine_error")

    def send_stats(self, interval: float) -> None:
        """Send every streaming session its ``stats`` event (called about once a second)."""
        step = self.scheduler.last_step_seconds
        overloaded = self.scheduler.overloaded()
        now = self.clock()
        for sid, session in self._attached.items():
            shown = session.frames_sent - self._frames_at_tick.get(sid, session.frames_sent)
            self._frames_at_tick[sid] = session.frames_sent
            session.send(protocol.stats_event(
                fps=shown / interval, buffered_seconds=self.scheduler.buffered_seconds(sid, now),
                chunk_ms=None if step is None else 1000 * step, queue_position=self.scheduler.queue_position(sid),
                sessions=len(self._attached), overloaded=overloaded, speed=self.scheduler.speed(sid),
                late_chunks=self.scheduler.late_chunks(sid),
            ))
        for sid in list(self._frames_at_tick):
            if sid not in self._attached:
                del self._frames_at_tick[sid]

    async def run_stats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.send_stats(interval)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
