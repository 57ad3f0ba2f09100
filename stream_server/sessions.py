"""Live sessions: identity, controls, frame queue, and the lifecycle that frees everything at the end.

Lifecycle: ``created`` (POST /v1/sessions) -> ``connecting`` (offer answered) -> ``streaming`` (peer
connected; the engine loop schedules it) -> ``disconnected`` (peer gone; a new offer with the same token
within the grace period resumes the same world and camera) -> ``ended``. A session ends by DELETE, when
its grace period or its idle timeout (no control message) runs out, when a created session never
connects within ``expires_in``, or on an engine failure. Ending frees the engine session, the peer
connection, the channels and the queue, runs the end hooks (replays) with a :class:`SessionRecord`, and
leaves an :class:`EndedSession` that answers status queries for ``ended_retention`` seconds.

No aiohttp, aiortc or torch here: transports and channels are small protocols implemented elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from world_model.controls import CameraRig, CameraParams
from world_model.engine_api import ChunkResult

from . import protocol
from .config import ServerConfig
from .metrics import ServerMetrics

log = logging.getLogger(__name__)

LIVE_STATES = ("created", "connecting", "streaming", "disconnected")
_INPUT_LOG = 256  # arrival times kept for this many recent input seqs (latency measurement)
_LATENCY_SAMPLES = 512  # input->frame latencies kept per session for p50/p95


class Channel(Protocol):
    """An open way to send events to the client (the data channel or a WebSocket)."""

    def send(self, text: str) -> None: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """The media connection of a session (a peer connection); closing it stops its track."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class FramePacket:
    index: int  # frame index in the session's video (from 0)
    rgb: np.ndarray  # (height, width, 3) uint8
    input_seq: int  # newest input seq applied to this frame's pose (-1: none yet)
    input_time: float | None  # when that input arrived (clock seconds), for the latency metric


class FrameQueue:
    """A bounded per-session frame buffer between the engine loop (producer) and the video track.

    It belongs to the session, not the track, so frames generated just before a disconnect are shown
    after the client reconnects. When full the oldest frame is dropped (the producer never blocks).
    """

    def __init__(self, capacity: int) -> None:
        self._frames: collections.deque[FramePacket] = collections.deque()
        self._capacity = capacity
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, packet: FramePacket) -> bool:
        """Queue ``packet``; returns False when an old frame had to be dropped for it."""
        dropped = len(self._frames) >= self._capacity
        if dropped:
            self._frames.popleft()
        self._frames.append(packet)
        self._ready.set()
        return not dropped

    async def get(self) -> FramePacket:
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    def clear(self) -> None:
        self._frames.clear()


@dataclass
class ChunkRecord:
    first_frame: int
    prompt: str
    poses: np.ndarray  # (chunk_pixel_frames, 4, 4) camera-to-world, as given to the engine
    input_seqs: tuple[int, ...]  # per frame, the input seq its pose used


@dataclass
class SessionRecord:
    """What a finished session leaves for the end hooks (e.g. queueing its replay)."""

    session_id: str
    token: str
    prompt: str
    seed: int
    image: np.ndarray | None  # the start image as uploaded (H, W, 3) uint8, or None
    created_at: float  # wall clock (time.time())
    ended_at: float
    reason: str
    frames_sent: int
    chunks: list[ChunkRecord]


EndHook = Callable[[SessionRecord], Awaitable[None]]


@dataclass(frozen=True)
class ChunkInput:
    """Everything the engine loop needs from a session to start its next chunk."""

    poses: np.ndarray  # (n, 4, 4)
    input_seq: int
    input_time: float | None
    prompt: str | None  # a new prompt to set before this chunk, else None
    keys: frozenset[str] = frozenset()  # the keys held when the chunk started (for the recording)
    mouse: tuple[float, float] = (0.0, 0.0)  # mouse-look motion spread over the chunk


class Session:
    """One viewer's world: its engine session, camera rig, newest input and frame queue."""

    def __init__(self, *, prompt: str, seed: int, image: np.ndarray | None, fps: int, now: float, queue_frames: int) -> None:
        self.id = secrets.token_urlsafe(24)  # 192 bits
        self.token = secrets.token_urlsafe(32)  # 256 bits
        self.prompt = prompt
        self.seed = seed
        self.image = image
        self.state = "created"
        self.engine_id: str | None = None
        self.created_at = now
        self.created_wall = time.time()
        self.last_activity = now
        self.disconnected_at: float | None = None
        self.ever_connected = False
        self.rig = CameraRig(CameraParams(fps=float(fps)))
        self.frames = FrameQueue(queue_frames)
        self.frames_sent = 0
        self.state_bytes = 0
        self.transport: Transport | None = None
        self.channels: set[Channel] = set()
        self.chunks: list[ChunkRecord] = []
        self.latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_SAMPLES)
        self._keys: frozenset[str] = frozenset()
        self._seq = -1
        self._mouse = [0.0, 0.0]  # look motion received since the last chunk started
        self._input_times: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._pending_prompt: str | None = None
        self._last_shown_seq = -1
        self._last_shown_time: float | None = None

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.token.encode())

    # -- controls -----------------------------------------------------------------------------------
    def handle_message(self, text: str | bytes, now: float) -> list[dict[str, Any]]:
        """Apply one client message; returns the events to answer with (pong or error)."""
        try:
            message = protocol.parse_client_message(text)
        except protocol.ProtocolError as exc:
            return [protocol.error_event(exc.code, exc.message)]
        self.last_activity = now
        if isinstance(message, protocol.PingMessage):
            return [protocol.pong_event(message.t)]
        if isinstance(message, protocol.PromptMessage):
            self._pending_prompt = message.text
            return []
        if message.seq < self._seq:
            return [protocol.error_event("stale_input", f"input seq {message.seq} is older than {self._seq}")]
        # A re-send of the same held keys (clients repeat every ~100 ms) is not a new input: it keeps the
        # time of the change it repeats, so the latency metric measures from the key press itself.
        changed = message.keys != self._keys or message.mouse_dx or message.mouse_dy or not self._input_times
        since = now if changed else next(reversed(self._input_times.values()))
        self._seq = message.seq
        self._keys = message.keys
        self._mouse[0] += message.mouse_dx
        self._mouse[1] += message.mouse_dy
        self._input_times[message.seq] = since
        while len(self._input_times) > _INPUT_LOG:
            self._input_times.popitem(last=False)
        return []

    def restart_input(self) -> None:
        """A reconnecting client counts its input seqs from scratch; keys are released until it says."""
        self._seq = -1
        self._keys = frozenset()
        self._mouse = [0.0, 0.0]
        self._input_times.clear()
        self._last_shown_seq = -1
        self._last_shown_time = None

    def next_chunk_input(self, frames: int) -> ChunkInput:
        """Roll the camera rig ``frames`` pixel frames with the newest held keys (mouse motion spread
        evenly over them) and take any pending prompt. Called by the engine loop at step start."""
        mouse = (self._mouse[0], self._mouse[1])
        dx, dy = mouse[0] / frames, mouse[1] / frames
        self._mouse = [0.0, 0.0]
        poses = np.stack([self.rig.step(self._keys, dx, dy) for _ in range(frames)])  # (frames, 4, 4)
        prompt, self._pending_prompt = self._pending_prompt, None
        if prompt is not None:
            self.prompt = prompt
        return ChunkInput(poses=poses, input_seq=self._seq, input_time=self._input_times.get(self._seq), prompt=prompt,
                          keys=self._keys, mouse=mouse)

    # -- frames -------------------------------------------------------------------------------------
    def deliver(self, result: ChunkResult, chunk: ChunkInput) -> int:
        """Queue a generated chunk for the video track; returns how many old frames were dropped."""
        n = len(result.frames)
        self.chunks.append(ChunkRecord(result.first_frame, self.prompt, chunk.poses, (chunk.input_seq,) * n))
        dropped = 0
        for i in range(n):
            packet = FramePacket(result.first_frame + i, result.frames[i], chunk.input_seq, chunk.input_time)
            dropped += not self.frames.put(packet)
        return dropped

    def frame_shown(self, packet: FramePacket, pts: int, now: float) -> float | None:
        """The track is about to send ``packet``: tell the client, count it, and return the
        input->frame latency when this is the first frame showing a new input."""
        self.send(protocol.frame_event(packet.index, pts, packet.input_seq))
        self.frames_sent += 1
        if packet.input_seq == self._last_shown_seq:
            return None
        self._last_shown_seq = packet.input_seq
        if packet.input_time is None or packet.input_time == self._last_shown_time:
            return None  # nothing new: a re-send of input already shown
        self._last_shown_time = packet.input_time
        latency = now - packet.input_time
        self.latencies.append(latency)
        return latency

    def latency_ms(self) -> dict[str, float | None]:
        if not self.latencies:
            return {"p50": None, "p95": None}
        ordered = sorted(self.latencies)
        pick = lambda q: round(1000 * ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))], 1)  # noqa: E731
        return {"p50": pick(0.5), "p95": pick(0.95)}

    # -- events -------------------------------------------------------------------------------------
    def send(self, event: dict[str, Any]) -> None:
        text = protocol.encode(event)
        for channel in list(self.channels):
            channel.send(text)


@dataclass(frozen=True)
class EndedSession:
    """What remains of a session after it ended, to answer ``GET /v1/sessions/{id}``."""

    id: str
    token: str
    reason: str
    ended_at: float  # clock seconds
    frames_sent: int
    seconds: float
    latency_ms: dict[str, float | None]

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.token.encode())


class EngineLink(Protocol):
    """What the registry needs from the engine loop (see :mod:`stream_server.loop`)."""

    async def open_session(self, *, prompt: str, image: np.ndarray | None, seed: int) -> str: ...

    async def close_session(self, engine_id: str) -> None: ...

    def attach(self, session: Session) -> None: ...

    def detach(self, session: Session) -> None: ...


class ServerFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"all {retry_after} sessions busy")
        self.retry_after = retry_after


class SessionRegistry:
    """Owns every session from creation to being forgotten; enforces ``max_sessions`` and timeouts."""

    def __init__(self, config: ServerConfig, engine: EngineLink, metrics: ServerMetrics, *, fps: int, chunk_frames: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.fps = fps
        self.chunk_frames = chunk_frames
        self.clock = clock
        self.end_hooks: list[EndHook] = []  # awaited with each ended session's record, in order
        self.live: dict[str, Session] = {}
        self.ended: dict[str, EndedSession] = {}

    def lookup(self, session_id: str) -> Session | EndedSession | None:
        return self.ended.get(session_id) or self.live.get(session_id)

    def _deadline(self, session: Session) -> float:
        """When the session ends unless something happens first."""
        if session.state == "streaming":
            return session.last_activity + self.config.idle_timeout
        if session.ever_connected and session.disconnected_at is not None:
            return session.disconnected_at + self.config.grace_period
        return session.created_at + self.config.connect_timeout

    def expires_in(self, session: Session) -> float:
        return max(0.0, self._deadline(session) - self.clock())

    def _update_gauge(self) -> None:
        for state in LIVE_STATES:
            self.metrics.sessions_active.labels(state).set(sum(s.state == state for s in self.live.values()))

    async def create(self, *, prompt: str, image: np.ndarray | None, seed: int) -> Session:
        """Admit and open a session; raises :class:`ServerFull`, or the engine's error for bad input."""
        if len(self.live) >= self.config.max_sessions:
            self.metrics.sessions_refused.inc()
            soonest = min((self._deadline(s) for s in self.live.values() if s.state != "streaming"), default=None)
            wait = 30.0 if soonest is None else soonest - self.clock()
            raise ServerFull(retry_after=int(min(60, max(1, math.ceil(wait)))))
        queue_frames = 4 * self.chunk_frames
        session = Session(prompt=prompt, seed=seed, image=image, fps=self.fps, now=self.clock(), queue_frames=queue_frames)
        self.live[session.id] = session  # holds the slot while the engine opens it
        opening = asyncio.ensure_future(self.engine.open_session(prompt=prompt, image=image, seed=seed))
        try:
            session.engine_id = await asyncio.shield(opening)  # a cancelled request must not leak the engine session
        except asyncio.CancelledError:
            del self.live[session.id]
            opening.add_done_callback(self._close_orphan)
            raise
        except Exception:
            del self.live[session.id]
            raise
        self.metrics.sessions_created.inc()
        self._update_gauge()
        log.info("session %s created", session.id[:8])
        return session

    def _close_orphan(self, opening: asyncio.Future) -> None:
        if not opening.cancelled() and opening.exception() is None:
            asyncio.ensure_future(self.engine.close_session(opening.result()))

    # -- connection events ----------------------------------------------------------------------------
    async def offered(self, session: Session, transport: Transport) -> None:
        """A new offer was answered with ``transport``; any previous connection is replaced."""
        old, session.transport = session.transport, transport
        if old is not None:
            self.engine.detach(session)
            await old.close()
        if session.ever_connected:
            session.restart_input()
        session.state = "connecting"
        self._update_gauge()

    def connected(self, session: Session, transport: Transport) -> None:
        if session.transport is not transport or session.state == "ended":
            return
        session.state = "streaming"
        session.ever_connected = True
        session.disconnected_at = None
        session.last_activity = self.clock()
        self.engine.attach(session)
        self._update_gauge()
        log.info("session %s streaming", session.id[:8])

    def disconnected(self, session: Session, transport: Transport) -> None:
        if session.transport is not transport or session.state in ("ended", "disconnected", "created"):
            return
        self.engine.detach(session)
        session.state = "disconnected"
        session.disconnected_at = self.clock()
        self._update_gauge()
        log.info("session %s disconnected; grace %.0f s", session.id[:8], self.config.grace_period)

    def message(self, session: Session, text: str | bytes, reply: Callable[[str], None]) -> None:
        """Handle one control message from either channel; errors go back only to the sender."""
        for event in session.handle_message(text, self.clock()):
            if event["type"] == "error":
                self.metrics.messages_refused.labels(event["code"]).inc()
            reply(protocol.encode(event))

    # -- the end ----------------------------------------------------------------------------------------
    async def end(self, session: Session, reason: str) -> None:
        """End a live session and free everything it holds; later calls are no-ops.

        Status queries answer ``ended`` from the first moment; the session keeps its slot in
        ``live`` (and so counts toward ``max_sessions``) until its engine session is freed.
        """
        if session.state == "ended":
            return
        session.state = "ended"
        self.ended[session.id] = EndedSession(
            id=session.id, token=session.token, reason=reason, ended_at=self.clock(), frames_sent=session.frames_sent,
            seconds=session.frames_sent / self.fps, latency_ms=session.latency_ms(),
        )
        self.engine.detach(session)
        session.send(protocol.ended_event(reason))
        for channel in list(session.channels):
            channel.close()
        session.channels.clear()
        session.frames.clear()
        transport, session.transport = session.transport, None
        try:
            if transport is not None:
                await transport.close()
            if session.engine_id is not None:
                await self.engine.close_session(session.engine_id)
        finally:
            self.live.pop(session.id, None)
        self.metrics.sessions_ended.labels(reason).inc()
        self._update_gauge()
        log.info("session %s ended: %s (%d frames)", session.id[:8], reason, session.frames_sent)
        record = SessionRecord(
            session_id=session.id, token=session.token, prompt=session.prompt, seed=session.seed, image=session.image,
            created_at=session.created_wall, ended_at=time.time(), reason=reason, frames_sent=session.frames_sent,
            chunks=session.chunks,
        )
        for hook in self.end_hooks:
            try:
                await hook(record)
            except Exception:
                log.exception("end hook %r failed for session %s", hook, session.id[:8])

    async def sweep(self) -> None:
        """End sessions past their deadline and forget ended ones past retention."""
        now = self.clock()
        for session in list(self.live.values()):
            if session.state != "ended" and now >= self._deadline(session):
                if session.state == "streaming":
                    reason = "idle"
                elif session.ever_connected:
                    reason = "disconnected"
                else:
                    reason = "expired"
                await self.end(session, reason)
        for sid, ended in list(self.ended.items()):
            if now - ended.ended_at >= self.config.ended_retention:
                del self.ended[sid]

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("session sweep failed")

    async def close_all(self, reason: str = "shutdown") -> None:
        for session in list(self.live.values()):
            await self.end(session, reason)
