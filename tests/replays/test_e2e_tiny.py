"""End to end on the real ``tiny`` engine: a session streams (its recording grows while it runs), DELETE
queues it, the worker refines it (with the stand-in refiner unless ``world_model.refiner`` exists), and
both videos download with a Range request, each with exactly the session's frames."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
from aiohttp.test_utils import TestServer

from stream_server.app import APP_KEY, create_app
from stream_server.gate import GATE_NAME
from stream_server.recording import RecordingStore
from stream_server.refining import RefineWorker
from stream_server.sdk import StreamClient

from ..server.conftest import FAST
from .helpers import CHUNK_FRAMES, count_frames, identity_refine

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def tiny_engine():
    from world_model.engine import build_engine

    return build_engine("tiny")


def refine_fn():
    """The real tiny refiner when it is in the checkout, else the stand-in."""
    try:
        from world_model.refiner import Refiner
    except ModuleNotFoundError:
        return identity_refine
    import torch

    return Refiner.from_preset("tiny", 0, torch.float32, "cpu").refine_blocks


async def until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_stream_delete_refine_download(tiny_engine, tmp_path):
    config = dataclasses.replace(FAST, data_dir=tmp_path, step_prior=1.0, jit_margin=0.2)
    app = create_app(tiny_engine, config)
    async with TestServer(app, host="127.0.0.1") as server, StreamClient(str(server.make_url("")).rstrip("/")) as client:
        assert (await client.info())["replays"] is True
        session = await client.create_session("a quiet harbour at dusk")
        await session.connect()
        folder = tmp_path / "sessions" / session.id
        await until(lambda: lines(folder / "chunks.jsonl") >= 2, 90, "two recorded chunks")
        assert (folder / "preview.mp4.part").stat().st_size > 0 and not (folder / "preview.mp4").exists()
        assert (folder / "latents.f16").stat().st_size > 0 and (folder / "poses.f64").stat().st_size > 0
        gate = json.loads((tmp_path / GATE_NAME).read_text())  # the loop tells a refiner when the next live step starts
        assert isinstance(gate["idle_until"], float) and abs(gate["written"] - time.time()) < 5
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["token_sha256"] and session.token not in (folder / "meta.json").read_text()
        await session.end()  # DELETE: the recording is closed and queued before the answer

        meta = json.loads((folder / "meta.json").read_text())
        chunks = lines(folder / "chunks.jsonl")
        frames = meta["frames"]
        assert frames == chunks * CHUNK_FRAMES and meta["latents"]["frames"] == 1 + 3 * chunks
        assert meta["prompts"] == [{"chunk": 0, "latent_frame": 0, "prompt": "a quiet harbour at dusk"}] and meta["end_reason"] == "deleted"
        assert count_frames(folder / "preview.mp4") == frames
        jobs = app[APP_KEY].jobs
        assert jobs.get(session.id).state == "queued"

        worker = RefineWorker(RecordingStore(tmp_path), jobs, refine_fn(), tiny_engine.vae, model="tiny")
        assert await asyncio.to_thread(worker.run, session.id) == 1

        status = await client.request("GET", f"/v1/replays/{session.id}", token=session.token)
        assert status["state"] == "done" and status["progress"] == 1.0 and set(status["files"]) == {"preview", "refined"}
        for name in ("preview", "refined"):
            url = client.url(status["files"][name]["url"])
            async with client.http.get(url, params={"token": session.token}) as whole:
                data = await whole.read()
                assert whole.status == 200
            async with client.http.get(url, headers={"Authorization": f"Bearer {session.token}", "Range": "bytes=0-1023"}) as part:
                assert part.status == 206 and part.headers["Content-Range"] == f"bytes 0-1023/{len(data)}"
                assert await part.read() == data[:1024]
            assert count_frames(data) == frames, name
