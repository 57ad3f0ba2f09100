"""The Python SDK (stream_server.sdk) against a real ``serve --model tiny``: the whole session round trip
over the data channel and over the WebSocket control path, and the server's errors as ServerError."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from stream_server.sdk import Frame, ServerError, Session, StreamClient

from .conftest import MAX_SESSIONS

pytestmark = pytest.mark.asyncio

EFFECT_SECONDS = 20.0  # generous: a held key shows from the next chunk on (1.5 s of video per chunk)


async def frames_until(session: Session, done, timeout: float = EFFECT_SECONDS) -> list[Frame]:
    """Frames received until ``done(frame)`` holds (that frame included)."""
    seen: list[Frame] = []
    async with asyncio.timeout(timeout):
        async for frame in session.frames():
            seen.append(frame)
            if done(frame):
                return seen
    raise AssertionError(f"the video ended after {len(seen)} frames")


async def test_round_trip_over_the_data_channel(server):
    async with StreamClient(server) as client:
        info = await client.info()
        assert info["model"] == "tiny"
        gradient = np.linspace(0, 255, 96 * 160 * 3).reshape(96, 160, 3).astype(np.uint8)
        session = await client.create_session(prompt="a sunny meadow under a blue sky", image=gradient, seed=3)
        assert session.id and session.token and session.expires_in > 0
        await session.connect()

        first = await frames_until(session, lambda f: True)
        frame = first[0]
        assert frame.rgb.shape == (info["height"], info["width"], 3) and frame.rgb.dtype == np.uint8
        assert frame.input_seq == -1 and frame.index is not None
        more = await frames_until(session, lambda f: f.index >= frame.index + 4)
        assert [f.index for f in more] == list(range(frame.index + 1, frame.index + 5))  # metadata matches frames

        seq = await session.send_input(keys=["w", "d"], mouse=(2.0, -1.0))
        moved = await frames_until(session, lambda f: f.input_seq is not None and f.input_seq >= seq)
        assert moved[-1].input_seq >= seq  # held keys are repeated, so newer seqs may show already
        assert session.last_sent_seq >= seq

        await session.set_prompt("the same meadow, now under falling snow")
        assert await session.ping() < 2.0
        await frames_until(session, lambda f: True)
        assert not [e for e in session.events if e["type"] == "error"], list(session.events)

        status = await session.status()
        assert status["state"] == "streaming"
        assert status["frames_sent"] > 0 and status["state_bytes"] > 0
        assert status["latency_ms"]["p50"] is not None
        await session.wait_event(lambda e: e["type"] == "stats")

        await session.end()
        assert (await session.status())["state"] == "ended"


async def test_round_trip_over_the_websocket(server):
    png = io.BytesIO()
    Image.new("RGB", (128, 64), (30, 120, 200)).save(png, format="PNG")
    async with StreamClient(server) as client:
        session = await client.create_session(prompt="a blue lake", image=png.getvalue())
        await session.connect(control="websocket")
        with pytest.raises(ValueError, match="unknown keys"):
            await session.send_input(keys=["x"])
        seq = await session.send_input(keys=["i"])
        frames = await frames_until(session, lambda f: f.input_seq is not None and f.input_seq >= seq)
        assert frames[-1].rgb.std() > 0  # random weights give noise, never a flat picture
        await session.send_raw('{"type": "jump"}')
        error = await session.wait_event(lambda e: e["type"] == "error")
        assert error["code"] == "unknown_type"
        await session.end()
        ended = await session.wait_event(lambda e: e["type"] == "ended")
        assert ended["reason"] == "deleted"


async def test_a_session_from_a_named_scene_streams(server):
    async with StreamClient(server) as client:
        info, scenes = await client.info(), await client.scenes()
        assert len(scenes) >= 3 and all((s["width"], s["height"]) == (info["width"], info["height"]) for s in scenes)
        session = await client.create_session(prompt=scenes[-1]["prompt"], scene=scenes[-1]["id"])
        await session.connect()
        (frame,) = await frames_until(session, lambda f: True)
        assert frame.rgb.shape == (info["height"], info["width"], 3)
        await session.end()


async def test_server_errors_are_raised(server):
    async with StreamClient(server) as client:
        with pytest.raises(ServerError) as empty:
            await client.create_session(prompt="  ")
        assert (empty.value.status, empty.value.code) == (400, "bad_request")
        with pytest.raises(ServerError) as garbage:
            await client.create_session(prompt="x", image=b"not an image")
        assert garbage.value.status == 400
        with pytest.raises(ServerError) as no_scene:
            await client.create_session(prompt="x", scene="no-such-scene")
        assert (no_scene.value.status, no_scene.value.code) == (400, "unknown_scene")

        session = await client.create_session(prompt="a quiet harbour")
        intruder = Session(client, session.id, "not-the-token", 0)
        with pytest.raises(ServerError) as forbidden:
            await intruder.status()
        assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")
        with pytest.raises(ServerError) as missing:
            await Session(client, "no-such-session", session.token, 0).status()
        assert missing.value.status == 404

        others = [await client.create_session(prompt="filler") for _ in range(MAX_SESSIONS - 1)]
        with pytest.raises(ServerError) as full:
            await client.create_session(prompt="one too many")
        assert (full.value.status, full.value.code) == (503, "server_full")
        assert full.value.retry_after is not None and full.value.retry_after >= 1

        for other in others:
            await other.end()
        await session.end()
        with pytest.raises(ServerError) as ended:
            await session.connect()
        assert (ended.value.status, ended.value.code) == (409, "session_ended")

    with pytest.raises(ServerError) as unreachable:
        async with StreamClient("http://127.0.0.1:9") as nowhere:
            await nowhere.info()
    assert unreachable.value.status == 0
