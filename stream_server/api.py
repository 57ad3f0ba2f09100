"""The HTTP API of interface.md: sessions, signalling, status, WebSocket controls, start scenes, info, health,
metrics.

Every failure is answered as JSON ``{"error": {"code", "message"}}`` with a 4xx/5xx status and touches
no other session; unexpected exceptions are logged and answered with a bare 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from world_model.engine_api import EngineError, EngineInfo

from .config import ServerConfig
from .images import ImageError, decode_base64, decode_image
from .loop import EngineLoop
from .metrics import ServerMetrics
from .protocol import MAX_PROMPT_CHARS, error_event, encode
from .rtc import OfferError
from .scenes import SceneCatalog
from .sessions import EndedSession, ServerFull, Session, SessionRegistry

log = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1
_CREATE_FIELDS = {"prompt", "image", "scene", "seed"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:  # aiohttp's own: 404 route, 405, 413 body too large, ...
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.reason, {k: v for k, v in exc.headers.items() if k == "Allow"})
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error")


def cors_middleware(allow_origins: tuple[str, ...]):
    """CORS for the listed origins ("*": any); without any, browsers keep the API same-origin."""

    @web.middleware
    async def cors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in allow_origins or origin in allow_origins)
        if allowed and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if allowed and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return cors


class _WebSocketChannel:
    """A WebSocket as a session channel: sends go through a queue so their order is kept."""

    _MAX_QUEUED = 1024  # a client that stops reading loses events, not the server's memory

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._closing = False
        self._pump = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while (text := await self._queue.get()) is not None:
            if self._ws.closed:
                return
            await self._ws.send_str(text)
        await self._ws.close()

    def send(self, text: str) -> None:
        if not self._closing and self._queue.qsize() < self._MAX_QUEUED:
            self._queue.put_nowait(text)

    def close(self) -> None:
        """Send what is queued, then close the socket."""
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)

    def stop(self) -> None:
        """The socket is gone: stop sending (unless a close is already flushing)."""
        if not self._closing:
            self._pump.cancel()


class Api:
    """Request handlers over one registry, engine loop and metrics."""

    def __init__(self, config: ServerConfig, info: EngineInfo, registry: SessionRegistry, loop: EngineLoop,
                 metrics: ServerMetrics, answer: Callable[[Session, str], Awaitable[str]], scenes: SceneCatalog) -> None:
        self.config = config
        self.info = info
        self.registry = registry
        self.loop = loop
        self.metrics = metrics
        self.answer = answer
        self.scenes = scenes

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/info", self.get_info)
        app.router.add_get("/metrics", self.get_metrics)
        app.router.add_get("/v1/scenes", self.list_scenes)
        app.router.add_get("/v1/scenes/{id}.png", self.scene_png)
        app.router.add_post("/v1/sessions", self.create_session)
        app.router.add_post("/v1/sessions/{id}/offer", self.offer)
        app.router.add_get("/v1/sessions/{id}", self.status)
        app.router.add_delete("/v1/sessions/{id}", self.delete)
        app.router.add_get("/v1/sessions/{id}/ws", self.websocket)

    # -- helpers --------------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> Session | EndedSession:
        """The session named in the path, if the request carries its token (401 / 404 / 403 otherwise)."""
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else request.query.get("token", "")
        if not token:
            raise ApiError(401, "unauthorized", "send the session token as 'Authorization: Bearer <token>' or ?token=")
        session = self.registry.lookup(request.match_info["id"])
        if session is None:
            raise ApiError(404, "not_found", "no such session (it may have ended long ago)")
        if not session.check_token(token):
            raise ApiError(403, "forbidden", "wrong token for this session")
        return session

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        try:
            body = json.loads(await request.text())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        return body

    # -- handlers --------------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model": self.info.model, "width": self.info.width, "height": self.info.height, "fps": self.info.fps,
            "chunk_frames": self.info.chunk_pixel_frames, "max_sessions": self.config.max_sessions,
            "active_sessions": len(self.registry.live), "device": self.info.device, "dtype": self.info.dtype,
            "replays": self.config.data_dir is not None,
        })

    async def get_metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = self.metrics.content_type
        return response

    async def list_scenes(self, request: web.Request) -> web.Response:
        return web.json_response(self.scenes.listing())

    async def scene_png(self, request: web.Request) -> web.Response:
        scene_id = request.match_info["id"]
        if scene_id not in self.scenes:
            raise ApiError(404, "not_found", f"no start scene {scene_id!r}; GET /v1/scenes lists them")
        return web.Response(body=await self.scenes.png(scene_id), content_type="image/png")

    async def _create_fields(self, request: web.Request) -> tuple[Any, Any, Any, Any]:
        """(prompt, image bytes or None, scene id or None, seed) from a JSON or multipart body, not yet validated."""
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise ApiError(413, "body_too_large", f"the body exceeds {self.config.max_body_bytes} bytes")
        if request.content_type == "multipart/form-data":
            form = await request.post()
            unknown = set(form) - _CREATE_FIELDS
            if unknown:
                raise ApiError(400, "bad_request", f"unknown fields {sorted(unknown)}")
            image = form.get("image")
            if isinstance(image, web.FileField):
                image = image.file.read()
            elif isinstance(image, str):
                image = decode_base64(image)
            seed = form.get("seed")
            if isinstance(seed, str):
                try:
                    seed = int(seed)
                except ValueError:
                    raise ApiError(400, "bad_request", "seed must be an integer") from None
            return form.get("prompt"), image, form.get("scene"), seed
        body = await self._json_body(request)
        unknown = set(body) - _CREATE_FIELDS
        if unknown:
            raise ApiError(400, "bad_request", f"unknown fields {sorted(unknown)}")
        image = body.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise ApiError(400, "bad_request", "image must be a base64 string")
            image = decode_base64(image)
        return body.get("prompt"), image, body.get("scene"), body.get("seed", 0)

    async def _start_image(self, image_bytes: Any, scene: Any) -> Any:
        """The session's start image (uint8 RGB array): the uploaded one, a named scene, or None (the model's
        default)."""
        if scene is None:
            return None if image_bytes is None else decode_image(image_bytes, self.config.max_image_pixels)
        if image_bytes is not None:
            raise ApiError(400, "bad_request", "send either image or scene, not both")
        if not isinstance(scene, str):
            raise ApiError(400, "bad_request", "scene must be a scene id (a string)")
        if scene not in self.scenes:
            raise ApiError(400, "unknown_scene", f"no start scene {scene!r}; GET /v1/scenes lists them")
        return await self.scenes.rgb(scene)

    async def create_session(self, request: web.Request) -> web.Response:
        try:
            prompt, image_bytes, scene, seed = await self._create_fields(request)
            if not isinstance(prompt, str) or not prompt.strip():
                raise ApiError(400, "bad_request", "prompt must be a non-empty string")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ApiError(400, "prompt_too_long", f"prompt has {len(prompt)} characters; limit {MAX_PROMPT_CHARS}")
            if seed is None:
                seed = 0
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
                raise ApiError(400, "bad_request", "seed must be an integer in [0, 2^63)")
            image = await self._start_image(image_bytes, scene)
        except ImageError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        try:
            session = await self.registry.create(prompt=prompt, image=image, seed=seed)
        except ServerFull as exc:
            raise ApiError(503, "server_full", "all session slots are taken; retry later",
                           {"Retry-After": str(exc.retry_after)}) from None
        except EngineError as exc:
            raise ApiError(400, "engine_refused", str(exc)) from None
        return web.json_response(
            {"session_id": session.id, "token": session.token, "expires_in": round(self.registry.expires_in(session), 1)},
            status=201,
        )

    async def offer(self, request: web.Request) -> web.Response:
        session = self._authorized(request)
        if isinstance(session, EndedSession):
            raise ApiError(409, "session_ended", f"the session has ended ({session.reason})")
        body = await self._json_body(request)
        if body.get("type") != "offer" or not isinstance(body.get("sdp"), str) or set(body) != {"sdp", "type"}:
            raise ApiError(400, "bad_request", 'expected {"sdp": str, "type": "offer"}')
        try:
            sdp = await self.answer(session, body["sdp"])
        except OfferError as exc:
            raise ApiError(400, "bad_offer", str(exc)) from None
        if session.state == "ended":  # ended while the answer was being made
            raise ApiError(409, "session_ended", "the session has ended")
        return web.json_response({"sdp": sdp, "type": "answer"})

    async def status(self, request: web.Request) -> web.Response:
        session = self._authorized(request)
        if isinstance(session, EndedSession):
            return web.json_response({
                "state": "ended", "reason": session.reason, "frames_sent": session.frames_sent,
                "seconds": round(session.seconds, 3), "state_bytes": 0, "latency_ms": session.latency_ms,
            })
        scheduler = self.loop.scheduler
        body: dict[str, Any] = {
            "state": session.state, "frames_sent": session.frames_sent,
            "seconds": round(session.frames_sent / self.info.fps, 3), "state_bytes": session.state_bytes,
            "latency_ms": session.latency_ms(), "queue_position": scheduler.queue_position(session.id),
            "buffered_seconds": round(scheduler.buffered_seconds(session.id, self.registry.clock()), 3),
            "late_chunks": scheduler.late_chunks(session.id), "expires_in": round(self.registry.expires_in(session), 1),
        }
        return web.json_response(body)

    async def delete(self, request: web.Request) -> web.Response:
        session = self._authorized(request)
        if isinstance(session, Session):
            await self.registry.end(session, "deleted")
        return web.json_response({"state": "ended"})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        session = self._authorized(request)
        if isinstance(session, EndedSession):
            raise ApiError(409, "session_ended", f"the session has ended ({session.reason})")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        channel = _WebSocketChannel(ws)
        session.channels.add(channel)
        try:
            async for message in ws:
                if session.state == "ended":
                    break
                if message.type == web.WSMsgType.TEXT:
                    self.registry.message(session, message.data, channel.send)
                elif message.type == web.WSMsgType.BINARY:
                    channel.send(encode(error_event("bad_message", "control messages are JSON text, not binary")))
        finally:
            session.channels.discard(channel)
            channel.stop()
        return ws
