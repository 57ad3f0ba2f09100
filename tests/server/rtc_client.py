"""A Python WebRTC viewer for the tests: offers recvonly video + the ``control`` channel, like the browser."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from aiohttp.test_utils import TestClient
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription


class Viewer:
    def __init__(self, client: TestClient, session_id: str, token: str) -> None:
        self.client = client
        self.session_id = session_id
        self.token = token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("control")
        self.events: list[dict] = []
        self.event_added = asyncio.Event()
        self.opened = asyncio.Event()
        self.track_ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", self._on_message)
        self.pc.on("track", lambda track: self.track_ready.done() or self.track_ready.set_result(track))

    def _on_message(self, text: str) -> None:
        self.events.append(json.loads(text))
        self.event_added.set()

    async def connect(self, timeout: float = 10.0) -> float:
        """Offer, apply the answer, wait for the control channel; returns the signalling time (s)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        start = time.monotonic()
        response = await self.client.post(
            f"/v1/sessions/{self.session_id}/offer",
            json={"sdp": self.pc.localDescription.sdp, "type": "offer"},
            headers={"Authorization": f"Bearer {self.token}"},
        )
        assert response.status == 200, await response.text()
        answer = await response.json()
        elapsed = time.monotonic() - start
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(self.opened.wait(), timeout)
        return elapsed

    def send(self, message: dict | str) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def wait_event(self, predicate, timeout: float = 10.0) -> dict:
        """The first event (seen so far or arriving) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            self.event_added.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event; got types {[e['type'] for e in self.events[-20:]]}")
            try:
                await asyncio.wait_for(self.event_added.wait(), remaining)
            except TimeoutError:
                pass

    async def frame(self, timeout: float = 10.0) -> np.ndarray:
        """The next decoded video frame as RGB."""
        track = await asyncio.wait_for(asyncio.shield(self.track_ready), timeout)
        frame = await asyncio.wait_for(track.recv(), timeout)
        return frame.to_ndarray(format="rgb24")

    async def close(self) -> None:
        await self.pc.close()
