"""The replay endpoints: status, downloads with Range, token rules, unknown / foreign ids and path tricks.
Recordings are written synthetically into the data dir of an app over the fake engine."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from stream_server.app import create_app
from stream_server.jobs import JobQueue

from ..server.conftest import FAST
from ..server.fake_engine import FakeEngine
from .helpers import CHUNK_FRAMES, count_frames, write_recording

pytestmark = pytest.mark.asyncio

MINE, OTHER = "mine-0123456789abcdef", "other-0123456789abcdef"
TOKEN, OTHER_TOKEN = "token-of-mine", "token-of-other"


@pytest.fixture
def data_dir(tmp_path):
    write_recording(tmp_path, MINE, TOKEN, chunks=2)
    write_recording(tmp_path, OTHER, OTHER_TOKEN, chunks=1)
    folder = tmp_path / "sessions" / MINE
    (folder / "refined.mp4").write_bytes((folder / "preview.mp4").read_bytes())  # as a finished job leaves it
    queue = JobQueue(tmp_path)
    job = queue.claim("w", 30, MINE)
    queue.finish(job, lambda: None)
    return tmp_path


@pytest_asyncio.fixture
async def client(data_dir):
    app = create_app(FakeEngine(), dataclasses.replace(FAST, data_dir=data_dir))
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_info_reports_replays(client):
    assert (await (await client.get("/v1/info")).json())["replays"] is True


async def test_status(client):
    response = await client.get(f"/v1/replays/{MINE}", headers=bearer(TOKEN))
    body = await response.json()
    assert response.status == 200, body
    assert body["state"] == "done" and body["progress"] == 1.0 and body["frames"] == 2 * CHUNK_FRAMES
    assert set(body["files"]) == {"preview", "refined"}
    assert body["files"]["preview"]["url"] == f"/v1/replays/{MINE}/preview.mp4"
    other = await (await client.get(f"/v1/replays/{OTHER}?token={OTHER_TOKEN}")).json()
    assert other["state"] == "queued" and other["progress"] == 0 and set(other["files"]) == {"preview"}


@pytest.mark.parametrize("name", ["preview.mp4", "refined.mp4"])
async def test_download_whole_and_range(client, data_dir, name):
    whole = await client.get(f"/v1/replays/{MINE}/{name}?token={TOKEN}")
    data = await whole.read()
    assert whole.status == 200 and whole.headers["Content-Type"] == "video/mp4"
    assert data == (data_dir / "sessions" / MINE / name).read_bytes()
    assert count_frames(data) == 2 * CHUNK_FRAMES
    part = await client.get(f"/v1/replays/{MINE}/{name}", headers={**bearer(TOKEN), "Range": "bytes=100-199"})
    assert part.status == 206
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert await part.read() == data[100:200]


async def test_refined_not_ready(client):
    response = await client.get(f"/v1/replays/{OTHER}/refined.mp4", headers=bearer(OTHER_TOKEN))
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_ready"


@pytest.mark.parametrize("path", [f"/v1/replays/{MINE}", f"/v1/replays/{MINE}/preview.mp4"])
async def test_token_rules(client, path):
    missing = await client.get(path)
    assert missing.status == 401 and missing.content_type == "application/json"
    wrong = await client.get(path, headers=bearer("nope"))
    assert wrong.status == 403 and b"ftyp" not in await wrong.read()
    foreign = await client.get(path, headers=bearer(OTHER_TOKEN))  # another session's token
    assert foreign.status == 403 and b"ftyp" not in await foreign.read()


@pytest.mark.parametrize("path", [
    "/v1/replays/unknown-0123456789abcdef", "/v1/replays/unknown-0123456789abcdef/preview.mp4",
    f"/v1/replays/{MINE}/meta.json", f"/v1/replays/{MINE}/start.png", f"/v1/replays/{MINE}/latents.f16",
    "/v1/replays/..%2F..%2Fjobs.sqlite3", f"/v1/replays/{MINE}%2F..%2F{OTHER}/preview.mp4",
    "/v1/replays/../sessions/preview.mp4", f"/v1/replays/.{MINE}/preview.mp4", "/v1/replays/%2e%2e/preview.mp4",
])
async def test_unknown_ids_and_path_tricks(client, path):
    response = await client.get(path, headers=bearer(TOKEN))
    body = await response.read()
    assert 400 <= response.status < 500, (path, response.status)
    assert b"ftyp" not in body and b"token_sha256" not in body and b"SQLite" not in body


async def test_token_survives_a_restart(data_dir):
    """A new app over the same data dir (a restarted server) still serves the replay for the token."""
    app = create_app(FakeEngine(), dataclasses.replace(FAST, data_dir=data_dir))
    async with TestClient(TestServer(app, host="127.0.0.1")) as restarted:
        response = await restarted.get(f"/v1/replays/{MINE}/refined.mp4", headers=bearer(TOKEN))
        assert response.status == 200 and count_frames(await response.read()) == 2 * CHUNK_FRAMES
