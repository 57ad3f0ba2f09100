"""Settings of a running server: one frozen dataclass, built by the CLI (or a test) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 8  # live sessions (created, streaming or in their grace period) at once
    max_batch: int | None = None  # sessions per engine step; None: max_sessions
    data_dir: Path | None = None  # recordings, replays and the refinement queue; None: nothing is recorded
    no_refiner: str | None = None  # why the served model has no refiner: replays are preview-only, no job; None: queued
    replay_ttl: float | None = None  # seconds a replay is kept after its session ended; None: no limit
    max_replay_bytes: int | None = None  # total size of replays kept (oldest deleted first); None: no limit
    retention_interval: float = 300.0  # seconds between applications of the two limits above
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs handed to aiortc; empty: host candidates only
    allow_origins: tuple[str, ...] = ()  # extra origins allowed by CORS ("*" for any); empty: same-origin
    connect_timeout: float = 60.0  # seconds a created session may wait for its first offer (expires_in)
    grace_period: float = 30.0  # seconds a disconnected session waits for its client to reconnect
    idle_timeout: float = 300.0  # seconds without any control message before a session is ended
    ended_retention: float = 600.0  # seconds an ended session still answers GET with state "ended"
    max_body_bytes: int = 16 * 1024 * 1024  # largest accepted request body (413 above)
    max_image_pixels: int = 4096 * 4096  # largest accepted start image (413 above)
    jit_margin: float = 0.08  # seconds a chunk should arrive before the viewer's buffer runs dry
    max_engine_busy: float = 0.8  # share of each chunk's time the scheduler plans engine steps into, if it can
    step_prior: float = 0.5  # seconds assumed for a step before any has been measured
    stats_interval: float = 1.0  # seconds between stats events
    sweep_interval: float = 1.0  # seconds between checks for expired / idle / abandoned sessions
    client_dir: Path | None = field(default=None)  # static client; None: client_web/ of the checkout

    @property
    def batch_limit(self) -> int:
        return self.max_batch or self.max_sessions
