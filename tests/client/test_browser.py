"""The browser client end to end: Debian's Chromium, driven by Playwright, against ``serve --model tiny``.

Skipped (with the reason) where /usr/bin/chromium or the playwright package is missing; CI installs both.
See tests/client/README.md for the browser flags and how to run these by hand.
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import MAX_SESSIONS

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

# Headless, no GPU, no network chatter; fake media UI so no permission prompt can ever block a test.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
]
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
STREAM_TIMEOUT_MS = 30_000  # first picture: session creation, ICE on loopback and the first chunk on CPU
EFFECT_TIMEOUT_MS = 20_000  # a held key shows from the next chunk on (1.5 s of video per chunk)
VIDEO = "document.querySelector('world-stream').shadowRoot.querySelector('video')"  # page-side expression


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the start and streaming screenshots go: the README's folder with UPDATE_SCREENSHOTS=1."""
    folder = DOCS_SCREENSHOTS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    # End what the test left running, so the server's slots are free for the next test.
    page.evaluate("() => Promise.all([...document.querySelectorAll('world-stream')].map((e) => e.end().catch(() => {})))")
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def metrics(page, selector: str = "world-stream") -> dict:
    return page.evaluate(f"() => document.querySelector('{selector}').metrics")


def hud(page) -> dict:
    """The HUD's data-* attributes (what the user sees, as numbers)."""
    return page.evaluate("() => ({...document.querySelector('world-stream').shadowRoot.querySelector('.hud').dataset})")


def on_screen_message(page) -> str:
    return page.evaluate("""() => { const box = document.querySelector('world-stream').shadowRoot.querySelector('.message');
                                   return box.hidden ? '' : box.querySelector('p').textContent; }""")


def video_time(page) -> float:
    return page.evaluate(f"() => {VIDEO}.currentTime")


def video_pixels(page) -> np.ndarray:
    """A screenshot of the video's centre (clear of the HUD and the hint), as RGB."""
    png = page.locator("world-stream video").screenshot()
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w, _ = rgb.shape
    return rgb[h // 4: 3 * h // 4, w // 4: 3 * w // 4]


def wait_for_input_effect(page, since_seq: int) -> None:
    page.wait_for_function(
        f"() => document.querySelector('world-stream').metrics.inputSeq >= {since_seq}", timeout=EFFECT_TIMEOUT_MS)


def api(server: str, method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server + path, method=method, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_app_streams_a_sample_scene_and_follows_the_keys(page, server, screenshots):
    page.goto(server + "/")
    page.wait_for_function("() => document.querySelector('#server-info').textContent.includes('tiny')")
    status, scenes = api(server, "GET", "/v1/scenes")
    assert status == 200 and len(scenes) >= 3
    page.wait_for_function(f"() => document.querySelectorAll('.sample img').length === {len(scenes)}")  # the server's scenes
    page.wait_for_function("() => [...document.querySelectorAll('.sample img')].every((img) => img.complete && img.naturalWidth > 0)")
    page.screenshot(path=str(screenshots / "start.png"))

    scene = scenes[0]
    page.click(f".sample[data-scene={scene['id']}]")
    page.wait_for_selector("#image-preview:not([hidden])")
    assert page.get_attribute("#image-preview", "src") == f"/v1/scenes/{scene['id']}.png"
    assert page.input_value("#prompt") == scene["prompt"]
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/sessions")) as created:
        page.click("#start-button")
    body = json.loads(created.value.post_data)
    assert body["scene"] == scene["id"] and "image" not in body  # the id, not an upload
    page.wait_for_function("() => document.querySelector('world-stream').metrics.frames > 0", timeout=STREAM_TIMEOUT_MS)
    page.wait_for_function(f"() => {VIDEO}.currentTime > 0", timeout=STREAM_TIMEOUT_MS)
    start = video_time(page)
    page.wait_for_timeout(1500)
    assert video_time(page) > start, "the video does not play"

    # Keys typed into a text field are text, not steering.
    page.click("#live-prompt")
    page.keyboard.type("wasd")
    assert int(hud(page)["sentSeq"]) == -1
    page.fill("#live-prompt", "")

    page.locator("world-stream .stage").focus()
    page.keyboard.down("w")
    page.keyboard.down("ArrowLeft")
    page.wait_for_function("() => document.querySelector('world-stream').metrics.sentSeq >= 0")
    wait_for_input_effect(page, 0)
    page.wait_for_function("() => document.querySelector('world-stream').metrics.latencyMs !== null", timeout=EFFECT_TIMEOUT_MS)
    held = metrics(page)
    page.wait_for_timeout(1000)
    assert metrics(page)["sentSeq"] >= held["sentSeq"] + 8, "held keys are not repeated every 100 ms"
    page.keyboard.up("w")
    page.keyboard.up("ArrowLeft")

    shown = hud(page)
    assert float(shown["fps"]) > 0 and float(shown["latencyMs"]) > 0
    text = page.locator("world-stream .hud").inner_text()
    assert "fps" in text and " ms" in text
    pixels = video_pixels(page)
    assert pixels.std() > 5, f"the video looks blank (pixel std {pixels.std():.1f})"
    page.screenshot(path=str(screenshots / "streaming.jpg"), quality=85)  # noise: PNG would be ~10x larger

    page.fill("#live-prompt", "the same meadow at sunset")
    page.click("#prompt-form button")
    page.click("#end-button")
    page.wait_for_function("() => !document.querySelector('#new-button').hidden")
    assert on_screen_message(page) == "Session ended."
    assert page.evaluate("() => document.querySelector('world-stream').session") is None


def test_without_server_scenes_the_app_offers_its_canvas_scenes(page, server):
    page.route("**/v1/scenes", lambda route: route.fulfill(status=404, content_type="application/json", body='{"error": {"code": "not_found", "message": "x"}}'))
    page.goto(server + "/")
    page.wait_for_function("() => document.querySelectorAll('.sample canvas').length === 3")
    assert page.locator(".sample img").count() == 0
    page.click(".sample[data-scene=meadow]")
    page.wait_for_selector("#image-preview:not([hidden])")
    assert page.get_attribute("#image-preview", "src").startswith("blob:") and "meadow" in page.input_value("#prompt")


def test_server_full_is_explained(page, server):
    fillers = [api(server, "POST", "/v1/sessions", {"prompt": "filler"})[1] for _ in range(MAX_SESSIONS)]
    try:
        page.goto(server + "/")
        page.fill("#prompt", "a harbour at dusk")
        page.click("#start-button")
        page.wait_for_function("""() => document.querySelector('world-stream').shadowRoot
                                  .querySelector('.message p').textContent.startsWith('Server full')""")
        assert "retry in" in on_screen_message(page)
        assert page.locator("world-stream .message button").is_disabled()
    finally:
        for created in fillers:
            api(server, "DELETE", f"/v1/sessions/{created['session_id']}", token=created["token"])


def test_element_in_the_example_page_streams_reconnects_and_ends(page, server):
    page.goto(server + "/example.html")  # <world-stream ... autostart>
    page.wait_for_function("() => document.querySelector('world-stream').metrics.frames > 0", timeout=STREAM_TIMEOUT_MS)
    session_id = page.evaluate("() => document.querySelector('world-stream').session.id")

    page.click("#walk")  # holds w for 2 s through the SDK
    wait_for_input_effect(page, 0)

    page.evaluate("() => document.querySelector('world-stream').session.reconnect()")
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('connection: reconnecting')")
    page.wait_for_function("() => document.querySelector('world-stream').session.state === 'connected'", timeout=STREAM_TIMEOUT_MS)
    frames = metrics(page)["frames"]
    page.wait_for_function(f"() => document.querySelector('world-stream').metrics.frames > {frames}", timeout=STREAM_TIMEOUT_MS)
    assert page.evaluate("() => document.querySelector('world-stream').session.id") == session_id

    page.evaluate("() => document.querySelector('world-stream').end()")
    page.wait_for_function("() => document.querySelector('#log').textContent.includes('ended: deleted')")
    assert on_screen_message(page) == "Session ended."


def test_touch_joystick_steers_on_a_phone(browser, server):
    context = browser.new_context(viewport={"width": 400, "height": 800}, has_touch=True, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(server + "/example.html")
        page.wait_for_function("() => document.querySelector('world-stream').metrics.frames > 0", timeout=STREAM_TIMEOUT_MS)
        box = page.locator("world-stream .joystick").bounding_box()
        assert box is not None, "no on-screen joystick on a touch device"
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        touch = context.new_cdp_session(page)  # Playwright has no touch-drag; Chromium's DevTools protocol does
        touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
        touch.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y - 50}]})
        page.wait_for_function("() => document.querySelector('world-stream').controls.keys.join() === 'w'")
        wait_for_input_effect(page, 0)
        touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        page.wait_for_function("() => document.querySelector('world-stream').controls.keys.length === 0")
        page.evaluate("() => document.querySelector('world-stream').end()")
    finally:
        context.close()
