"""Named start scenes: ``GET /v1/scenes``, ``GET /v1/scenes/{id}.png`` and sessions opened with ``"scene"``."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from aiohttp import FormData
from PIL import Image

from world_model.start_scenes import START_SCENES, render_scene

from .conftest import bearer, new_session, parts
from .rtc_client import Viewer

pytestmark = pytest.mark.asyncio

FAKE_SIZE = (64, 48)  # the fake engine's video


async def error_code(response, status: int) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return (await response.json())["error"]["code"]


async def test_lists_the_scenes_and_serves_each_as_a_png_of_the_video_size(client, monkeypatch):
    listing = await (await client.get("/v1/scenes")).json()
    assert len(listing) >= 3 and len({s["id"] for s in listing}) == len(listing)
    for scene in listing:
        assert {"id", "title", "width", "height"} <= set(scene) and (scene["width"], scene["height"]) == FAKE_SIZE
        response = await client.get(f"/v1/scenes/{scene['id']}.png")
        assert response.status == 200 and response.content_type == "image/png"
        image = Image.open(io.BytesIO(await response.read()))
        assert image.format == "PNG" and image.size == FAKE_SIZE
        (known,) = [s for s in START_SCENES if s.id == scene["id"]]
        assert np.array_equal(np.asarray(image.convert("RGB")), render_scene(known, *FAKE_SIZE))

    catalog = parts(client).scenes  # rendered once: later requests come from memory
    monkeypatch.setattr(catalog, "_render", lambda scene: pytest.fail(f"{scene.id} rendered twice"))
    assert (await client.get(f"/v1/scenes/{listing[0]['id']}.png")).status == 200


async def test_unknown_scenes_are_json_errors(client, engine):
    assert await error_code(await client.get("/v1/scenes/nope.png"), 404) == "not_found"
    assert await error_code(await client.get("/v1/scenes/..%2Fetc.png"), 404) == "not_found"
    scene = START_SCENES[0].id
    png = base64.b64encode((await (await client.get(f"/v1/scenes/{scene}.png")).read())).decode()
    for body, code in [
        ({"prompt": "x", "scene": "nope"}, "unknown_scene"),
        ({"prompt": "x", "scene": 3}, "bad_request"),
        ({"prompt": "x", "scene": scene, "image": png}, "bad_request"),
    ]:
        assert await error_code(await client.post("/v1/sessions", json=body), 400) == code
    form = FormData(default_to_multipart=True)
    form.add_field("prompt", "x")
    form.add_field("scene", "nope")
    assert await error_code(await client.post("/v1/sessions", data=form), 400) == "unknown_scene"
    assert engine.sessions == {}


async def test_a_session_opened_with_a_scene_starts_from_it_and_streams(client, engine):
    scene = START_SCENES[1]
    created = await new_session(client, scene=scene.id, seed=3)
    (state,) = engine.sessions.values()
    assert np.array_equal(state["image"], render_scene(scene, *FAKE_SIZE)) and state["seed"] == 3
    viewer = Viewer(client, created["session_id"], created["token"])
    await viewer.connect()
    try:
        assert (await viewer.frame()).shape == (FAKE_SIZE[1], FAKE_SIZE[0], 3)
        await viewer.wait_event(lambda e: e["type"] == "frame" and e["index"] >= 8)
    finally:
        await viewer.close()
    assert (await client.delete(f"/v1/sessions/{created['session_id']}", headers=bearer(created["token"]))).status == 200

    form = FormData(default_to_multipart=True)  # multipart takes the scene too
    form.add_field("prompt", "x")
    form.add_field("scene", START_SCENES[2].id)
    assert (await client.post("/v1/sessions", data=form)).status == 201
    (state,) = engine.sessions.values()
    assert np.array_equal(state["image"], render_scene(START_SCENES[2], *FAKE_SIZE))
