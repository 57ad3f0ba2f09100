"""The video track of a session: it paces frames from the session's queue and stamps 90 kHz timestamps.

It never runs the model. aiortc's own ``VideoStreamTrack`` paces at 30 fps; the world model runs at its
own rate (16 fps for SANA-WM), so this track keeps a wall-clock schedule at ``fps`` itself. When the
queue runs dry (a late chunk) the schedule restarts at the moment the next frame arrives, so the
timestamps jump by the length of the stall, as a receiver expects from a live source.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Callable

import av
from aiortc import MediaStreamTrack

from .metrics import ServerMetrics
from .sessions import Session

VIDEO_CLOCK = 90_000  # RTP clock rate of video, Hz
TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


class SessionVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, session: Session, fps: int, metrics: ServerMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._session = session
        self._period = 1.0 / fps
        self._metrics = metrics
        self._clock = clock
        self._origin: float | None = None  # clock time of pts 0
        self._next: float | None = None  # clock time at which the next frame is due

    async def recv(self) -> av.VideoFrame:
        packet = await self._session.frames.get()
        now = self._clock()
        if self._origin is None:
            self._origin = now
        if self._next is None or self._next < now:  # first frame, or the queue ran dry: restart the schedule
            self._next = now
        elif self._next > now:
            await asyncio.sleep(self._next - now)
        pts = round((self._next - self._origin) * VIDEO_CLOCK)
        self._next += self._period
        frame = av.VideoFrame.from_ndarray(packet.rgb, format="rgb24")
        frame.pts = pts
        frame.time_base = TIME_BASE
        latency = self._session.frame_shown(packet, pts, self._clock())
        self._metrics.frames_sent.inc()
        if latency is not None:
            self._metrics.input_latency.observe(latency)
        return frame
