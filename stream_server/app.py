"""Assemble the server: engine loop, scheduler, sessions, WebRTC, HTTP API and the static client.

``create_app(engine, config)`` takes an already built engine (anything implementing
:class:`world_model.engine_api.Engine`), so this module, like the rest of the server, never touches torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web

from world_model.engine_api import Engine

from .api import Api, cors_middleware, error_middleware
from .config import ServerConfig
from .gate import GatePublisher
from .jobs import JobQueue
from .loop import EngineLoop
from .metrics import ServerMetrics
from .recording import Recorder, RecordingStore, recover_recordings
from .replays import Replays, Retention, run_retention
from .rtc import configure_bitrates, offer_handler_factory
from .scenes import SceneCatalog
from .scheduler import Scheduler, StepTimeEstimator
from .sessions import EndHook, SessionRegistry

log = logging.getLogger(__name__)

CLIENT_DIR = Path(__file__).resolve().parent.parent / "client_web"
APP_KEY = web.AppKey("sana_wm_server", object)  # the ServerParts of an app, for tests and later issues

_NOT_BUILT = """<!doctype html><meta charset="utf-8"><title>SANA-WM stream</title>
<p>The browser client is not built: <code>client_web/index.html</code> is missing.
The HTTP API is up: see <a href="/v1/info">/v1/info</a>.</p>"""


class ServerParts:
    """The long-lived objects of one app; ``end_hooks`` is where the replay jobs subscribe."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        info = engine.info
        self.config = config
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(
            chunk_seconds=info.chunk_pixel_frames / info.fps, max_batch=config.batch_limit,
            margin_seconds=config.jit_margin, estimator=StepTimeEstimator(config.step_prior),
            max_busy=config.max_engine_busy,
        )
        self.loop = EngineLoop(engine, self.scheduler, self.metrics)
        self.registry = SessionRegistry(config, self.loop, self.metrics, fps=info.fps, chunk_frames=info.chunk_pixel_frames)
        self.loop.on_failure = self.registry.end
        answer = offer_handler_factory(self.registry, self.metrics, fps=info.fps, ice_servers=config.ice_servers)
        self.scenes = SceneCatalog(info.width, info.height)
        self.api = Api(config, info, self.registry, self.loop, self.metrics, answer, self.scenes)
        self.jobs: JobQueue | None = None
        self.recorder: Recorder | None = None
        self.replays: Replays | None = None
        if config.data_dir is not None:  # record sessions and serve their replays
            store = RecordingStore(config.data_dir)
            self.jobs = jobs = JobQueue(config.data_dir)
            unrefined = {} if config.no_refiner is None else {info.model: config.no_refiner}  # their replays: preview-only
            recover_recordings(store, jobs, unrefined=unrefined)  # left open by a killed server; before any session records
            self.recorder = Recorder(store, info, jobs.enqueue, unrefined=unrefined)
            self.loop.on_chunk = self.recorder.chunk
            self.loop.gate = GatePublisher(config.data_dir)  # a refine worker sharing the device yields to live steps
            self.registry.end_hooks.append(self.recorder.end)
            self.replays = Replays(store, self.jobs)
        self._tasks: list[asyncio.Task] = []

    @property
    def end_hooks(self) -> list[EndHook]:
        return self.registry.end_hooks

    async def start(self, app: web.Application) -> None:
        self._tasks = [
            asyncio.ensure_future(self.loop.run()),
            asyncio.ensure_future(self.loop.run_stats(self.config.stats_interval)),
            asyncio.ensure_future(self.registry.run_sweeper()),
        ]
        retention = Retention(self.config.replay_ttl, self.config.max_replay_bytes)
        if self.replays is not None and retention.active:
            self._tasks.append(asyncio.ensure_future(run_retention(
                self.replays.store, self.jobs, retention, self.registry.live, self.config.retention_interval)))

    async def stop(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.registry.close_all()
        if self.recorder is not None:
            await self.recorder.close_all()
        self.loop.shutdown()


def _add_client(app: web.Application, client_dir: Path) -> None:
    index = client_dir / "index.html"
    if not index.is_file():
        log.warning("no browser client at %s; serving a placeholder page", index)

        async def placeholder(request: web.Request) -> web.Response:
            return web.Response(text=_NOT_BUILT, content_type="text/html")

        app.router.add_get("/", placeholder)
        return

    root_dir = client_dir.resolve()

    async def client_file(request: web.Request) -> web.FileResponse:
        """A file of the client; anything outside the folder or missing is a JSON 404 (after the API routes)."""
        path = (root_dir / request.match_info.get("path", "index.html")).resolve()
        if root_dir not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app.router.add_get("/", client_file)
    app.router.add_get("/{path:.+}", client_file)


def create_app(engine: Engine, config: ServerConfig = ServerConfig()) -> web.Application:
    """The aiohttp application serving ``engine`` with ``config``."""
    info = engine.info
    configure_bitrates(info.width, info.height, info.fps)
    app = web.Application(
        middlewares=[cors_middleware(config.allow_origins), error_middleware], client_max_size=config.max_body_bytes
    )
    parts = ServerParts(engine, config)
    app[APP_KEY] = parts
    parts.api.add_routes(app)
    if parts.replays is not None:
        parts.replays.add_routes(app)
    _add_client(app, config.client_dir or CLIENT_DIR)
    app.on_startup.append(parts.start)
    app.on_shutdown.append(parts.stop)
    return app
