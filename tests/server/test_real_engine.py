"""End to end on the real built-in ``tiny`` engine (random weights, CPU, 256x128, 16 fps, 24-frame chunks).

An in-process aiortc client (the Python SDK, or the tests' ``Viewer``) talks to ``create_app`` served by
aiohttp's ``TestServer`` on loopback: frames arrive at the model's rate, input reaches the frames, two
sessions share engine steps, and DELETE or a disconnect frees everything the session held.

Timing asserts are deliberately loose (this runs on a loaded 2-core CI machine): conditions are awaited
with timeouts, and rates are measured over seconds, not single frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from stream_server.app import APP_KEY, create_app
from stream_server.sdk import Session, StreamClient

from .conftest import bearer, new_session, with_config
from .rtc_client import Viewer

pytestmark = pytest.mark.asyncio

FPS_BOUNDS = (12.0, 20.0)  # model fps is 16; the track paces on wall time, a loaded machine adds jitter
RATE_SECONDS = 3.0  # how long the arrival rate of decoded frames is measured


@pytest.fixture(scope="module")
def tiny_engine():
    from world_model.engine import build_engine

    return build_engine("tiny")


@pytest.fixture
def step_log(tiny_engine, monkeypatch):
    """Every engine step's session ids, in order (the engine's ``step`` wrapped, for this test only)."""
    log: list[tuple[str, ...]] = []
    step = tiny_engine.step

    def recording_step(requests):
        log.append(tuple(r.session_id for r in requests))
        return step(requests)

    monkeypatch.setattr(tiny_engine, "step", recording_step)
    return log


@contextlib.asynccontextmanager
async def serving(engine, **config):
    """``create_app(engine, config)`` on 127.0.0.1; yields (base URL, the app's ServerParts)."""
    app = create_app(engine, with_config(**{"step_prior": 1.0, "jit_margin": 0.2, **config}))
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/"), app[APP_KEY]


async def until(condition, timeout: float, what, interval: float = 0.05):
    """Wait for ``condition()`` to be truthy; fail naming ``what`` (a string, or a callable giving one)
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval)
    return value


async def frames_until(session: Session, predicate, timeout: float):
    """The first decoded frame (with its ``frame`` message) matching ``predicate``."""
    async def scan():
        async for frame in session.frames():
            if predicate(frame):
                return frame
        pytest.fail("the video track ended")

    try:
        return await asyncio.wait_for(scan(), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"no matching frame within {timeout:g} s")


def server_tasks(before: set[asyncio.Task]) -> list[asyncio.Task]:
    """Tasks started since ``before`` that are still running, except aiohttp's keep-alive connection
    handlers (one per pooled HTTP connection, not per session)."""
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() - before
            if t is not current and not t.done() and "RequestHandler.start" not in repr(t.get_coro())]


def histogram(metrics_text: str, name: str) -> dict[str, float]:
    """``{le: cumulative count}`` plus ``count`` and ``sum`` of one Prometheus histogram."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if m := re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)$', line):
            out[m.group(1)] = float(m.group(2))
        elif m := re.match(rf"{name}_(count|sum) (\S+)$", line):
            out[m.group(1)] = float(m.group(2))
    return out


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


async def test_frames_arrive_at_model_fps_and_carry_input_seq(tiny_engine):
    info = tiny_engine.info
    async with serving(tiny_engine) as (url, _parts), StreamClient(url) as client:
        session = await client.create_session(prompt="a quiet harbour at dusk", seed=1)
        await session.connect()
        first = await frames_until(session, lambda f: True, timeout=60)
        assert first.rgb.shape == (info.height, info.width, 3) and first.input_seq == -1

        # The rate of decoded frames, measured from the second chunk on (the first may still be warming up).
        await frames_until(session, lambda f: f.index is not None and f.index >= info.chunk_pixel_frames, timeout=30)
        arrivals: list[float] = []
        indices: list[int] = []
        async def count():
            async for frame in session.frames():
                arrivals.append(time.monotonic())
                indices.append(frame.index)
                if arrivals[-1] - arrivals[0] >= RATE_SECONDS:
                    return
        await asyncio.wait_for(count(), RATE_SECONDS + 15)
        fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        assert FPS_BOUNDS[0] <= fps <= FPS_BOUNDS[1], f"{fps:.1f} fps received; model fps {info.fps}"
        known = [i for i in indices if i is not None]
        assert len(known) >= 0.9 * len(indices) and known == sorted(known)  # frame messages matched, in order

        # Input: a new seq shows up in `frame` messages, from a chunk boundary on, and keeps following.
        for keys in (["w", "d"], []):
            seq = await session.send_input(keys=keys)
            sent = time.monotonic()
            moved = await frames_until(session, lambda f, s=seq: f.input_seq is not None and f.input_seq >= s, timeout=30)
            assert moved.index % info.chunk_pixel_frames == 0
            assert time.monotonic() - sent < 15  # about chunk/2 + step + margin; generous for a busy machine
        status = await session.status()
        assert status["state"] == "streaming" and status["latency_ms"]["p50"] is not None


async def test_two_sessions_share_engine_steps(tiny_engine, step_log, monkeypatch):
    """Two sessions that join together are stepped in one batch, and stay batched (equal deadlines).

    WebRTC connections complete at slightly different moments, and the scheduler deliberately runs
    staggered sessions alone, so the test holds the first ``attach`` until the second connects: both
    then join the engine loop at the same instant, as concurrent sessions crowding together do. The
    scheduler also runs sessions alone whenever single steps keep real time (the CPU case), so every
    step here first waits 0.8 s, as a GPU's fixed cost per step: two steps of one no longer fit a chunk.
    """
    step = tiny_engine.step

    def slow_step(requests):
        time.sleep(0.8)
        return step(requests)

    monkeypatch.setattr(tiny_engine, "step", slow_step)
    async with serving(tiny_engine) as (url, parts), StreamClient(url) as client:
        joining = []
        attach = parts.loop.attach

        def attach_together(session):
            joining.append(session)
            if len(joining) == 2:
                for waiting in joining:
                    attach(waiting)

        monkeypatch.setattr(parts.loop, "attach", attach_together)
        sessions = [await client.create_session(prompt=f"world {i}", seed=i) for i in range(2)]
        engine_ids = {parts.registry.live[s.id].engine_id for s in sessions}
        await asyncio.gather(*(s.connect() for s in sessions))
        for session in sessions:  # both stream video, into their third chunk
            await frames_until(session, lambda f: f.index is not None and f.index >= 2 * tiny_engine.info.chunk_pixel_frames, 30)
        assert step_log and set(step_log[0]) == engine_ids  # the first step already served both
        assert sum(set(step) == engine_ids for step in step_log) >= 3
        async with client.http.get(f"{url}/metrics") as response:
            batches = histogram(await response.text(), "sana_engine_batch_size")
        assert batches["count"] >= 3 and batches["1.0"] == 0  # the batch-size histogram: no step of one
        assert batches["sum"] == 2 * batches["count"]


async def test_delete_and_disconnect_free_everything(tiny_engine):
    async with serving(tiny_engine, grace_period=1.0) as (url, parts), StreamClient(url) as client:
        for how in ("delete", "disconnect"):
            before = set(asyncio.all_tasks())
            session = await client.create_session(prompt="a harbour", seed=2)
            await session.connect()
            await frames_until(session, lambda f: True, timeout=60)
            server_session = parts.registry.live[session.id]
            connection = server_session.transport  # the server's RtcConnection
            assert tiny_engine.sessions() == [server_session.engine_id]
            assert server_tasks(before)  # the check below sees the session's tasks (aiortc's, the track's)

            if how == "delete":
                await session.end()  # DELETE, then the client closes its side
                assert parts.registry.ended[session.id].reason == "deleted"
            else:
                await session.close()  # the client just goes away; the grace period (1 s) runs out
                await until(lambda: session.id in parts.registry.ended, 30, "the disconnected session to end")
                assert parts.registry.ended[session.id].reason == "disconnected"

            await until(lambda: not tiny_engine.sessions(), 10, "the engine session to be closed")
            await until(lambda: not parts.registry.live and not len(parts.scheduler), 10, "registry and scheduler to be empty")
            assert connection.pc.connectionState == "closed"
            assert not server_session.channels and len(server_session.frames) == 0
            await until(lambda: not server_tasks(before), 10, lambda: f"the session's tasks to end after {how}: {server_tasks(before)}")
