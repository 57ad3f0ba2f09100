"""End to end on the real built-in ``tiny`` engine: WebRTC frames, input reaching them, DELETE freeing it."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from stream_server.app import create_app

from .conftest import bearer, new_session, with_config
from .rtc_client import Viewer

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def tiny_engine():
    try:
        from world_model.engine import build_engine
    except ModuleNotFoundError as exc:  # the engine is being written alongside the server
        pytest.skip(f"world_model.engine is not importable yet: {exc}")
    return build_engine("tiny")


async def test_tiny_engine_streams_and_follows_input(tiny_engine):
    info = tiny_engine.info
    config = with_config(step_prior=1.0, jit_margin=0.2)
    async with TestClient(TestServer(create_app(tiny_engine, config), host="127.0.0.1")) as client:
        created = await new_session(client, prompt="a quiet harbour at dusk")
        viewer = Viewer(client, created["session_id"], created["token"])
        await viewer.connect()
        try:
            frame = await viewer.frame(timeout=60)
            assert frame.shape == (info.height, info.width, 3)
            viewer.send({"type": "input", "seq": 1, "keys": ["w", "d"]})
            event = await viewer.wait_event(lambda e: e["type"] == "frame" and e["input_seq"] == 1, timeout=60)
            assert event["index"] % info.chunk_pixel_frames == 0
            status = await (await client.get(f"/v1/sessions/{created['session_id']}", headers=bearer(created["token"]))).json()
            assert status["state"] == "streaming" and status["state_bytes"] > 0
            assert (await client.delete(f"/v1/sessions/{created['session_id']}", headers=bearer(created["token"]))).status == 200
            assert tiny_engine.sessions() == []
        finally:
            await viewer.close()
