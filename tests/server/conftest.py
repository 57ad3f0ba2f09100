"""Fixtures for the server tests: an app over the fake engine, served on loopback, and an HTTP client."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from stream_server.app import APP_KEY, create_app
from stream_server.config import ServerConfig

from .fake_engine import FakeEngine

FAST = ServerConfig(
    max_sessions=3, connect_timeout=30.0, grace_period=5.0, idle_timeout=60.0, sweep_interval=0.1,
    stats_interval=0.5, jit_margin=0.05, step_prior=0.05, max_body_bytes=256 * 1024, client_dir=None,
)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def config() -> ServerConfig:
    return FAST


@pytest_asyncio.fixture
async def client(engine: FakeEngine, config: ServerConfig):
    app = create_app(engine, config)
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


def parts(client: TestClient):
    return client.app[APP_KEY]


def with_config(**changes) -> ServerConfig:
    return dataclasses.replace(FAST, **changes)


async def new_session(client: TestClient, prompt: str = "a harbour at dusk", **fields) -> dict:
    response = await client.post("/v1/sessions", json={"prompt": prompt, **fields})
    assert response.status == 201, await response.text()
    return await response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
