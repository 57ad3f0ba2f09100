"""The HTTP API without media: the happy path and every error path of interface.md."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from stream_server.app import create_app

from .conftest import bearer, new_session, parts, with_config

pytestmark = pytest.mark.asyncio


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


async def error_of(response, status: int) -> str:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


async def test_health_info_and_the_client(client):
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    info = await (await client.get("/v1/info")).json()
    assert {k: info[k] for k in ("model", "width", "height", "fps", "chunk_frames", "max_sessions", "active_sessions")} == {
        "model": "fake", "width": 64, "height": 48, "fps": 16, "chunk_frames": 8, "max_sessions": 3, "active_sessions": 0,
    }
    page = await client.get("/")
    assert page.status == 200 and "world-stream" in await page.text()  # client_web/index.html
    assert await error_of(await client.get("/no/such/path"), 404) == "not_found"


async def test_a_missing_client_gets_a_placeholder(engine, tmp_path):
    async with TestClient(TestServer(create_app(engine, with_config(client_dir=tmp_path / "missing")))) as c:
        page = await c.get("/")
        assert page.status == 200 and "not built" in await page.text()


async def test_serves_the_built_client(engine, tmp_path):
    (tmp_path / "index.html").write_text("<title>client</title>")
    (tmp_path / "app.js").write_text("console.log(1)")
    async with TestClient(TestServer(create_app(engine, with_config(client_dir=tmp_path)))) as c:
        assert "<title>client</title>" in await (await c.get("/")).text()
        assert await (await c.get("/app.js")).text() == "console.log(1)"
        assert (await c.get("/v1/info")).status == 200


async def test_create_status_delete_json(client, engine):
    created = await new_session(client, seed=7, image=base64.b64encode(image_bytes("JPEG")).decode())
    assert set(created) == {"session_id", "token", "expires_in"}
    assert len(created["session_id"]) >= 22 and len(created["token"]) >= 22  # >= 128 bits each
    assert created["expires_in"] == pytest.approx(30.0, abs=1)
    (state,) = engine.sessions.values()
    assert state["seed"] == 7 and state["image"].shape == (24, 32, 3)
    sid, auth = created["session_id"], bearer(created["token"])
    status = await (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
    assert status["state"] == "created" and status["frames_sent"] == 0 and status["latency_ms"] == {"p50": None, "p95": None}
    assert (await client.get(f"/v1/sessions/{sid}?token={created['token']}")).status == 200
    assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status == 200
    assert engine.sessions == {}  # the engine session is freed
    status = await (await client.get(f"/v1/sessions/{sid}", headers=auth)).json()
    assert status["state"] == "ended" and status["reason"] == "deleted"
    assert (await client.delete(f"/v1/sessions/{sid}", headers=auth)).status == 200  # idempotent
    assert await error_of(await client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "v=0", "type": "offer"}, headers=auth), 409)


async def test_create_multipart(client, engine):
    form = FormData()
    form.add_field("prompt", "a forest")
    form.add_field("seed", "3")
    form.add_field("image", image_bytes("PNG"), filename="start.png", content_type="image/png")
    response = await client.post("/v1/sessions", data=form)
    assert response.status == 201, await response.text()
    (state,) = engine.sessions.values()
    assert state["prompt"] == "a forest" and state["seed"] == 3 and state["image"].shape == (24, 32, 3)


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({}, 400, "bad_request"),  # no prompt
        ({"prompt": ""}, 400, "bad_request"),
        ({"prompt": 5}, 400, "bad_request"),
        ({"prompt": "x" * 5000}, 400, "prompt_too_long"),
        ({"prompt": "x", "seed": "1"}, 400, "bad_request"),
        ({"prompt": "x", "seed": -1}, 400, "bad_request"),
        ({"prompt": "x", "colour": "red"}, 400, "bad_request"),
        ({"prompt": "x", "image": "not base64!"}, 400, "bad_image"),
        ({"prompt": "x", "image": base64.b64encode(b"hello world").decode()}, 400, "bad_image"),
        ({"prompt": "x", "image": base64.b64encode(image_bytes("GIF")).decode()}, 415, "unsupported_image"),
        ({"prompt": "x", "image": 12}, 400, "bad_request"),
    ],
)
async def test_create_refuses_bad_input(client, engine, body, status, code):
    assert await error_of(await client.post("/v1/sessions", json=body), status) == code
    assert engine.sessions == {}


async def test_create_refuses_bad_json_type_and_size(client, config):
    assert await error_of(await client.post("/v1/sessions", data="{nope", headers={"Content-Type": "application/json"}), 400) == "bad_json"
    assert await error_of(await client.post("/v1/sessions", data="[1]", headers={"Content-Type": "application/json"}), 400) == "bad_request"
    assert await error_of(await client.post("/v1/sessions", data="prompt=x", headers={"Content-Type": "text/plain"}), 415) == "unsupported_media_type"
    big = json.dumps({"prompt": "x", "image": "A" * (config.max_body_bytes + 10)})
    assert await error_of(await client.post("/v1/sessions", data=big, headers={"Content-Type": "application/json"}), 413) == "body_too_large"
    form = FormData()
    form.add_field("prompt", "x")
    form.add_field("image", b"\0" * (config.max_body_bytes + 10), filename="a.png", content_type="image/png")
    assert (await client.post("/v1/sessions", data=form)).status == 413


async def test_huge_image_dimensions_are_refused(engine):
    async with TestClient(TestServer(create_app(engine, with_config(max_image_pixels=100)))) as c:
        body = {"prompt": "x", "image": base64.b64encode(image_bytes()).decode()}
        assert await error_of(await c.post("/v1/sessions", json=body), 413) == "image_too_large"


async def test_auth_errors(client):
    created = await new_session(client)
    sid = created["session_id"]
    offer = {"sdp": "v=0", "type": "offer"}
    assert await error_of(await client.get(f"/v1/sessions/{sid}"), 401) == "unauthorized"
    assert await error_of(await client.get(f"/v1/sessions/{sid}", headers=bearer("wrong")), 403) == "forbidden"
    assert await error_of(await client.get("/v1/sessions/nope", headers=bearer(created["token"])), 404) == "not_found"
    assert await error_of(await client.delete(f"/v1/sessions/{sid}", headers=bearer("wrong")), 403) == "forbidden"
    assert await error_of(await client.post(f"/v1/sessions/{sid}/offer", json=offer), 401) == "unauthorized"
    assert await error_of(await client.get(f"/v1/sessions/{sid}/ws?token=wrong"), 403) == "forbidden"
    # Nothing above harmed the session.
    assert (await (await client.get(f"/v1/sessions/{sid}", headers=bearer(created["token"]))).json())["state"] == "created"


async def test_bad_offers(client):
    created = await new_session(client)
    url, auth = f"/v1/sessions/{created['session_id']}/offer", bearer(created["token"])
    assert await error_of(await client.post(url, data="{", headers={**auth, "Content-Type": "application/json"}), 400) == "bad_json"
    assert await error_of(await client.post(url, json={"sdp": "v=0", "type": "answer"}, headers=auth), 400) == "bad_request"
    assert await error_of(await client.post(url, json={"sdp": "v=0\r\n", "type": "offer"}, headers=auth), 400) == "bad_offer"
    garbage = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=garbage\r\n"
    assert await error_of(await client.post(url, json={"sdp": garbage, "type": "offer"}, headers=auth), 400) == "bad_offer"
    assert parts(client).registry.live[created["session_id"]].state == "created"


async def test_full_server_answers_503_with_retry_after(client, config):
    for _ in range(config.max_sessions):
        await new_session(client)
    response = await client.post("/v1/sessions", json={"prompt": "one too many"})
    assert await error_of(response, 503) == "server_full"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    info = await (await client.get("/v1/info")).json()
    assert info["active_sessions"] == config.max_sessions


async def test_never_connected_session_expires_and_frees_its_slot(engine):
    async with TestClient(TestServer(create_app(engine, with_config(connect_timeout=0.3, max_sessions=1)))) as c:
        created = await new_session(c)
        assert (await c.post("/v1/sessions", json={"prompt": "x"})).status == 503
        await asyncio.sleep(0.6)
        status = await (await c.get(f"/v1/sessions/{created['session_id']}", headers=bearer(created["token"]))).json()
        assert status["state"] == "ended" and status["reason"] == "expired"
        assert engine.sessions == {}
        await new_session(c)  # the slot is free again


async def test_cors_only_for_allowed_origins(engine):
    async with TestClient(TestServer(create_app(engine, with_config(allow_origins=("https://app.example",))))) as c:
        ok = await c.get("/v1/info", headers={"Origin": "https://app.example"})
        assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
        other = await c.get("/v1/info", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        pre = await c.options("/v1/sessions", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.status == 204 and "Authorization" in pre.headers["Access-Control-Allow-Headers"]


async def test_websocket_controls_and_errors(client):
    created = await new_session(client)
    sid, token = created["session_id"], created["token"]
    async with client.ws_connect(f"/v1/sessions/{sid}/ws?token={token}") as ws:
        await ws.send_str(json.dumps({"type": "ping", "t": 1.5}))
        assert json.loads((await ws.receive()).data) == {"type": "pong", "t": 1.5}
        await ws.send_str("not json")
        assert json.loads((await ws.receive()).data)["code"] == "bad_json"
        await ws.send_bytes(b"\x00")
        assert json.loads((await ws.receive()).data)["code"] == "bad_message"
        await ws.send_str(json.dumps({"type": "input", "seq": 1, "keys": ["w"], "mouse": {"dx": 0.5, "dy": 0}}))
        await ws.send_str(json.dumps({"type": "ping", "t": 2}))
        assert json.loads((await ws.receive()).data)["type"] == "pong"  # input is accepted silently
        assert (await client.delete(f"/v1/sessions/{sid}", headers=bearer(token))).status == 200
        assert json.loads((await ws.receive()).data) == {"type": "ended", "reason": "deleted"}
        assert (await ws.receive()).type.name in ("CLOSE", "CLOSED", "CLOSING")


async def test_metrics_endpoint(client):
    await new_session(client)
    await client.post("/v1/sessions", json={"prompt": ""})
    text = await (await client.get("/metrics")).text()
    assert "sana_sessions_created_total 1.0" in text
    assert 'sana_sessions_active{state="created"} 1.0' in text
    for name in ("sana_engine_step_seconds", "sana_engine_batch_size", "sana_frames_sent_total",
                 "sana_input_to_frame_seconds", "sana_late_chunks_total", "sana_dropped_frames_total"):
        assert name in text
