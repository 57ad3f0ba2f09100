"""Every Prometheus metric of the server, defined once, on a registry owned by one app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    """The metrics of one server; a fresh registry per app so tests and apps never share counters."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("sana_sessions_active", "Sessions not yet ended, by state", ["state"], registry=r)
        self.sessions_created = Counter("sana_sessions_created", "Sessions created", registry=r)
        self.sessions_ended = Counter("sana_sessions_ended", "Sessions ended, by reason", ["reason"], registry=r)
        self.sessions_refused = Counter("sana_sessions_refused", "Session creations refused because the server was full", registry=r)
        self.step_seconds = Histogram("sana_engine_step_seconds", "Wall time of one engine step", buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("sana_engine_batch_size", "Sessions per engine step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.step_errors = Counter("sana_engine_step_errors", "Engine steps that raised", registry=r)
        self.frames_sent = Counter("sana_frames_sent", "Video frames handed to the encoder", registry=r)
        self.late_chunks = Counter("sana_late_chunks", "Chunks delivered after the viewer's buffer ran dry", registry=r)
        self.dropped_frames = Counter("sana_dropped_frames", "Frames dropped because a session's queue was full", registry=r)
        self.input_latency = Histogram(
            "sana_input_to_frame_seconds", "From an input message's arrival to the first frame showing it", buckets=_SECONDS, registry=r
        )
        self.messages_refused = Counter("sana_control_messages_refused", "Control messages answered with an error", ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
