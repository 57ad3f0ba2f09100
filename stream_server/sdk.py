"""A Python client for a ``sana-wm-stream`` server: HTTP via aiohttp, video via aiortc, controls over the
WebRTC ``control`` data channel (or the session WebSocket). Used by the end-to-end tests and benchmarks::

    async with StreamClient("http://127.0.0.1:8000") as client:
        session = await client.create_session(prompt="a quiet harbour at dusk", image=None, seed=0)
        await session.connect()
        await session.send_input(keys=["w"], mouse=(0.0, 0.0))   # held until the next send_input
        async for frame in session.frames():
            print(frame.index, frame.input_seq, frame.rgb.shape)  # (H, W, 3) uint8
            if frame.index >= 32:
                break
        await session.set_prompt("now it snows")
        print(await session.status())
        await session.end()

Every error answered by the server is raised as :class:`ServerError`. Held keys are re-sent every 90 ms
while any is held, as the protocol asks; other server events (stats, pong, error, ended) are collected
in ``session.events`` and can be awaited with :meth:`Session.wait_event`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)

KEYS = "wasdijkl"  # the action DSL's letters (world_model.controls.KEYS; not imported: that pulls in torch)
REPEAT_SECONDS = 0.09  # held keys are re-sent this often (the protocol asks for at least every 100 ms)
MATCH_WAIT = 0.5  # seconds a decoded frame waits for its `frame` message (they travel on different paths)
ENDED_WAIT = 1.0  # seconds end() waits for the server's `ended` event before closing the connection
_PENDING_FRAMES = 512  # unmatched `frame` messages kept
_EVENT_LOG = 4096  # other events kept in Session.events


class ServerError(Exception):
    """An error answered by the server: HTTP ``status`` (0: unreachable), ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, from Retry-After (503 server_full)


@dataclass(frozen=True)
class Frame:
    rgb: np.ndarray  # (height, width, 3) uint8
    index: int | None  # the frame's index in the session's video, from its `frame` message
    input_seq: int | None  # newest input seq this frame's camera used (-1: none yet)
    pts: int | None  # presentation time on the server's 90 kHz clock
    # index / input_seq / pts are None only when the frame's `frame` message never arrived


def encode_image(image: bytes | np.ndarray) -> str:
    """PNG/JPEG bytes or an (H, W, 3) uint8 array -> base64 for ``POST /v1/sessions``."""
    if isinstance(image, np.ndarray):
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be (H, W, 3) uint8; got {image.shape} {image.dtype}")
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        image = buffer.getvalue()
    if not isinstance(image, (bytes, bytearray)):
        raise TypeError(f"image must be bytes or a numpy array; got {type(image).__name__}")
    return base64.b64encode(image).decode("ascii")


class StreamClient:
    """An HTTP connection to one server; sessions it creates are ended when the ``async with`` exits."""

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None
        self._sessions: list[Session] = []

    async def __aenter__(self) -> StreamClient:
        self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for session in self._sessions:
            with contextlib.suppress(ServerError, aiohttp.ClientError, asyncio.TimeoutError):
                await session.end()
        if self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("use StreamClient inside 'async with'")
        return self._http

    def url(self, path: str) -> str:
        return self.base_url + path

    async def request(self, method: str, path: str, *, token: str | None = None, json_body: Any = None) -> Any:
        """One API call; returns the decoded JSON answer or raises :class:`ServerError`."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with self.http.request(method, self.url(path), json=json_body, headers=headers) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                if response.status >= 400:
                    error = body.get("error", {}) if isinstance(body, dict) else {}
                    retry = response.headers.get("Retry-After")
                    raise ServerError(response.status, error.get("code", f"http_{response.status}"),
                                      error.get("message", response.reason or ""),
                                      int(retry) if retry and retry.isdigit() else None)
                return body
        except aiohttp.ClientConnectionError as exc:
            raise ServerError(0, "unreachable", f"cannot reach {self.base_url}: {exc}") from None

    async def info(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/info")

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/healthz")

    async def scenes(self) -> list[dict[str, Any]]:
        """``GET /v1/scenes``: the server's named start scenes (``id``, ``title``, ``width``, ``height``, ``prompt``)."""
        return await self.request("GET", "/v1/scenes")

    async def create_session(self, prompt: str, image: bytes | np.ndarray | None = None, seed: int = 0, *,
                             scene: str | None = None) -> Session:
        """``POST /v1/sessions``; ``image``: PNG/JPEG bytes or an (H, W, 3) uint8 array, or ``scene``: the id of
        one of :meth:`scenes` (neither: the model's default start scene)."""
        body: dict[str, Any] = {"prompt": prompt, "seed": seed}
        if image is not None:
            body["image"] = encode_image(image)
        if scene is not None:
            body["scene"] = scene
        created = await self.request("POST", "/v1/sessions", json_body=body)
        session = Session(self, created["session_id"], created["token"], created["expires_in"])
        self._sessions.append(session)
        return session


class Session:
    """One live session: its WebRTC connection, control path, frames and events."""

    def __init__(self, client: StreamClient, session_id: str, token: str, expires_in: float) -> None:
        self.client = client
        self.id = session_id
        self.token = token
        self.expires_in = expires_in
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=_EVENT_LOG)
        self.ended_reason: str | None = None
        self._pc: RTCPeerConnection | None = None
        self._channel = None  # the aiortc data channel, when control goes over WebRTC
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ws_reader: asyncio.Task | None = None
        self._track: asyncio.Future | None = None
        self._event_added = asyncio.Event()
        self._pending: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()  # pts -> frame event
        self._pts_base: int | None = None  # server pts of the first decoded frame (aiortc counts from it)
        self._seq = 0
        self._held: list[str] = []
        self._repeat: asyncio.Task | None = None

    @property
    def path(self) -> str:
        return f"/v1/sessions/{self.id}"

    # -- connecting ---------------------------------------------------------------------------------
    async def connect(self, *, control: str = "datachannel", timeout: float = 20.0) -> None:
        """Offer WebRTC (recvonly video) and open the control path: the ``control`` data channel, or
        with ``control="websocket"`` the session WebSocket. Calling it again reconnects (same token)."""
        if control not in ("datachannel", "websocket"):
            raise ValueError(f"control must be 'datachannel' or 'websocket'; got {control!r}")
        await self._close_transport()
        loop = asyncio.get_running_loop()
        self._pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._track = track = loop.create_future()
        self._pending.clear()
        self._pts_base = None
        pc.addTransceiver("video", direction="recvonly")
        pc.on("track", lambda t: track.done() or track.set_result(t))
        connected = loop.create_future()

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "connected" and not connected.done():
                connected.set_result(None)

        opened = loop.create_future()
        if control == "datachannel":
            self._channel = channel = pc.createDataChannel("control")
            channel.on("open", lambda: opened.done() or opened.set_result(None))
            channel.on("message", self._on_message)
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers all candidates here
        answer = await self.client.request("POST", f"{self.path}/offer", token=self.token,
                                           json_body={"sdp": pc.localDescription.sdp, "type": "offer"})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        if control == "websocket":
            await self._open_websocket()
            opened.set_result(None)
        try:
            await asyncio.wait_for(asyncio.gather(connected, opened, track), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"session {self.id[:8]}: no WebRTC connection within {timeout:g} s") from None
        if self._held:
            await self.send_input(self._held)  # the server released our keys on reconnect

    async def _open_websocket(self) -> None:
        url = self.client.url(f"{self.path}/ws")
        try:
            self._ws = await self.client.http.ws_connect(url, params={"token": self.token})
        except aiohttp.WSServerHandshakeError as exc:
            raise ServerError(exc.status, "websocket_refused", exc.message) from None
        self._ws_reader = asyncio.ensure_future(self._read_websocket(self._ws))

    async def _read_websocket(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self._on_message(message.data)

    # -- events -------------------------------------------------------------------------------------
    def _on_message(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            log.warning("session %s: ignored a non-JSON event", self.id[:8])
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "frame":
            self._pending[event["pts"]] = event
            while len(self._pending) > _PENDING_FRAMES:
                self._pending.popitem(last=False)
        else:
            self.events.append(event)
            if event.get("type") == "ended":
                self.ended_reason = event.get("reason")
        self._event_added.set()

    async def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first collected non-frame event matching ``predicate`` (seen already or arriving)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in list(self.events):
                if predicate(event):
                    return event
            self._event_added.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event within {timeout:g} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event_added.wait(), remaining)

    # -- frames -------------------------------------------------------------------------------------
    async def frames(self) -> AsyncIterator[Frame]:
        """Decoded video frames with their ``frame`` message metadata, until the track ends."""
        if self._track is None:
            raise RuntimeError("call connect() first")
        track = await self._track
        while True:
            try:
                video = await track.recv()
            except MediaStreamError:
                return
            rgb = video.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            event = await self._match(video.pts)
            if event is None:
                yield Frame(rgb, None, None, None)
            else:
                yield Frame(rgb, event["index"], event["input_seq"], event["pts"])

    async def _match(self, pts: int) -> dict[str, Any] | None:
        """The ``frame`` message of the decoded frame at ``pts`` (counted from the first decoded frame).

        The server sends each message just before its frame, on another path, so it usually arrives
        first; the first frame fixes the offset between the two clocks, and a miss (a lost frame
        before the first one decoded) re-fixes it on the oldest waiting message.
        """
        deadline = time.monotonic() + MATCH_WAIT
        resynced = False
        while True:
            if self._pts_base is None and self._pending:
                self._pts_base = next(iter(self._pending)) - pts
            if self._pts_base is not None:
                event = self._pending.get(self._pts_base + pts)
                if event is not None:
                    while self._pending:  # drop the messages of this frame and of frames never decoded
                        if self._pending.popitem(last=False)[1] is event:
                            break
                    return event
            if time.monotonic() >= deadline:
                if resynced or not self._pending:
                    return None
                self._pts_base, resynced = None, True
                continue
            self._event_added.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event_added.wait(), max(0.0, deadline - time.monotonic()))

    # -- controls -----------------------------------------------------------------------------------
    async def send_raw(self, text: str) -> None:
        """Send ``text`` as is on the control path (also used to test the server's validation)."""
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_str(text)
        elif self._channel is not None and self._channel.readyState == "open":
            self._channel.send(text)
        else:
            raise RuntimeError(f"session {self.id[:8]} has no open control path; call connect()")

    async def _send(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message, separators=(",", ":")))

    async def send_input(self, keys: Iterable[str] = (), mouse: tuple[float, float] = (0.0, 0.0)) -> int:
        """Send the full set of held keys (``wasdijkl``) and look motion since the last call; returns the
        message's seq. While any key is held it is re-sent every 90 ms until the next call."""
        held = sorted(set(keys))
        unknown = [k for k in held if k not in KEYS]
        if unknown:
            raise ValueError(f"unknown keys {unknown}; allowed: {KEYS} (w/s move, a/d yaw, i/k pitch, j/l strafe)")
        self._held = held
        if self._repeat is not None:
            self._repeat.cancel()
            self._repeat = None
        seq = await self._send_input(*mouse)
        if self._held:
            self._repeat = asyncio.ensure_future(self._repeat_held())
        return seq

    async def _send_input(self, dx: float, dy: float) -> int:
        seq = self._seq
        await self._send({"type": "input", "seq": seq, "keys": self._held, "mouse": {"dx": float(dx), "dy": float(dy)}})
        self._seq += 1
        return seq

    async def _repeat_held(self) -> None:
        while True:
            await asyncio.sleep(REPEAT_SECONDS)
            try:
                await self._send_input(0.0, 0.0)
            except (RuntimeError, ConnectionError):  # the connection went away; connect() re-sends the held keys
                return

    @property
    def last_sent_seq(self) -> int:
        return self._seq - 1

    async def set_prompt(self, text: str) -> None:
        """Change the prompt from the next chunk on (a bad prompt comes back as an ``error`` event)."""
        await self._send({"type": "prompt", "text": text})

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of the control path, in seconds."""
        t = time.monotonic()
        await self._send({"type": "ping", "t": t})
        await self.wait_event(lambda e: e.get("type") == "pong" and e.get("t") == t, timeout)
        return time.monotonic() - t

    # -- status and the end ---------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """``GET /v1/sessions/{id}``: state, frames_sent, seconds, state_bytes, latency_ms, ..."""
        return await self.client.request("GET", self.path, token=self.token)

    async def end(self) -> None:
        """``DELETE /v1/sessions/{id}`` (a no-op answer if it already ended), then close the connection."""
        try:
            await self.client.request("DELETE", self.path, token=self.token)
            if self._pc is not None:  # the `ended` event is on its way on the control path: let it land
                with contextlib.suppress(TimeoutError):
                    await self.wait_event(lambda e: e.get("type") == "ended", timeout=ENDED_WAIT)
        except ServerError as exc:
            if exc.status != 404:  # 404: long ended and forgotten
                raise
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the local connection only; the session waits out its grace period on the server."""
        if self._repeat is not None:
            self._repeat.cancel()
            self._repeat = None
        await self._close_transport()

    async def _close_transport(self) -> None:
        if self._ws_reader is not None:
            self._ws_reader.cancel()
            self._ws_reader = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._pc is not None:
            pc, self._pc, self._channel = self._pc, None, None
            await pc.close()

