// <world-stream>: a live SANA-WM world in one element — video, HUD, keyboard/mouse/gamepad/touch controls,
// reconnects and clear messages. Embed it anywhere:
//
//   <script type="module" src="https://host:8000/world-stream.js"></script>
//   <world-stream server="https://host:8000" prompt="a quiet harbour at dusk" image="harbour.jpg" autostart></world-stream>
//
// Attributes: server (default: this page's origin), prompt, image (URL or data: URL), scene (the id of a
// server start scene, instead of image), seed, autostart.
// Methods: start({prompt, image, seed, scene}) -> Session, setPrompt(text), end(). Properties: session, metrics.
// Events (bubbling, composed): started {session}, frame, stats, error, ended, connectionstatechange —
// the SDK's events (sdk.js) re-dispatched from the element.

import { Controls, isTouchDevice } from "./controls.js";
import { Hud } from "./hud.js";
import { createSession, ServerError } from "./sdk.js";

const NO_VIDEO_MS = 8000; // connected but no picture for this long: tell the user why that may be

const ENDED_TEXT = {
  deleted: "Session ended.",
  idle: "Session ended after a long time without input.",
  disconnected: "Session ended: the connection was lost for too long.",
  expired: "Session expired before it connected.",
  shutdown: "Session ended: the server shut down.",
  engine_error: "Session ended: the world model failed on the server.",
  ended: "Session ended.",
};

const TEMPLATE = `
<style>
  :host { display: block; position: relative; background: #000; color: #fff; font: 14px/1.4 system-ui, sans-serif;
          aspect-ratio: 16 / 8.8; overflow: hidden; border-radius: 8px; }
  .stage { position: absolute; inset: 0; outline: none; cursor: pointer; touch-action: none; user-select: none; }
  .stage:focus-visible { box-shadow: inset 0 0 0 3px #6cf; }
  video { width: 100%; height: 100%; object-fit: contain; background: #000; display: block; }
  .hud { position: absolute; top: 8px; left: 8px; display: flex; gap: 12px; padding: 4px 8px; border-radius: 6px;
         background: rgba(0,0,0,.55); font: 12px/1.4 ui-monospace, monospace; pointer-events: none; }
  .hud .warning { color: #fc6; }
  .hud b { font-weight: 400; color: #9cf; margin-right: 4px; }
  .hint { position: absolute; bottom: 8px; left: 50%; transform: translateX(-50%); padding: 4px 10px;
          border-radius: 6px; background: rgba(0,0,0,.55); font-size: 12px; pointer-events: none; white-space: nowrap; }
  .message { position: absolute; inset: 0; display: flex; flex-direction: column; align-items: center;
             justify-content: center; gap: 12px; background: rgba(0,0,0,.7); text-align: center; padding: 16px; }
  .message[hidden], .touch[hidden], .hud[hidden] { display: none; }
  .message button { font: inherit; padding: 6px 16px; border-radius: 6px; border: 0; background: #6cf; color: #012; cursor: pointer; }
  .message button:disabled { opacity: .5; cursor: default; }
  .joystick { position: absolute; left: 24px; bottom: 24px; width: 120px; height: 120px; border-radius: 50%;
              background: rgba(255,255,255,.15); border: 2px solid rgba(255,255,255,.4); touch-action: none; }
  .knob { position: absolute; left: 35px; top: 35px; width: 50px; height: 50px; border-radius: 50%; background: rgba(255,255,255,.6); }
  .lookpad { position: absolute; right: 0; top: 0; bottom: 0; width: 50%; touch-action: none; }
</style>
<div class="stage" tabindex="0" part="stage">
  <video autoplay playsinline muted part="video"></video>
  <div class="hud" part="hud" hidden>
    <span><b>fps</b><span data-field="fps">0</span></span>
    <span><b>latency</b><span data-field="latency">–</span></span>
    <span><b>buffer</b><span data-field="buffer">–</span></span>
    <span><b>time</b><span data-field="time">0:00</span></span>
    <span data-field="warning" class="warning"></span>
  </div>
  <div class="touch" hidden>
    <div class="lookpad"></div>
    <div class="joystick"><div class="knob"></div></div>
  </div>
  <div class="hint" part="hint" hidden></div>
  <div class="message" part="message" hidden><p></p><button type="button" hidden></button></div>
</div>`;

export class WorldStreamElement extends HTMLElement {
  constructor() {
    super();
    const root = this.attachShadow({ mode: "open" });
    root.innerHTML = TEMPLATE;
    this.stage = root.querySelector(".stage");
    this.video = root.querySelector("video");
    this.hudRoot = root.querySelector(".hud");
    this.hintBox = root.querySelector(".hint");
    this.messageBox = root.querySelector(".message");
    this.touchBox = root.querySelector(".touch");
    this.hud = new Hud(this.hudRoot, this.video);
    this.session = null;
    this.controls = null;
    this._countdown = null;
    this._noVideoTimer = null;
    for (const type of ["focus", "blur"]) this.stage.addEventListener(type, () => this._updateHint());
    document.addEventListener("pointerlockchange", () => this._updateHint());
    window.addEventListener("online", () => this.session && this.session.reconnect()); // a new network: new path
    this.video.addEventListener("error", () => this._message("The video cannot be decoded in this browser (H.264/VP8)."));
  }

  connectedCallback() {
    if (this.hasAttribute("autostart") && !this.session) this.start().catch(() => {}); // shown on screen
  }

  disconnectedCallback() {
    if (this.session) this.end().catch(() => {});
  }

  /** The HUD's newest values: fps, latencyMs, bufferedSeconds, sessionSeconds, frames, inputSeq, sentSeq. */
  get metrics() {
    this.hud.render(); // fresh values, not those of the last display tick
    return { ...this.hud.values };
  }

  /** Create and connect a session; options override the attributes. Errors are shown and rethrown. */
  async start({ prompt, image, seed, scene } = {}) {
    if (this.session) await this.end();
    prompt = prompt ?? this.getAttribute("prompt") ?? "";
    if (image == null && scene == null) { // the start image is an option or an attribute, never a mix of both
      image = this.getAttribute("image");
      scene = this.getAttribute("scene");
    }
    seed = seed ?? Number.parseInt(this.getAttribute("seed") || "0", 10);
    this._message("Starting a world…");
    let session;
    try {
      if (typeof image === "string" && image && !image.startsWith("data:")) image = await fetchImage(image);
      session = await createSession(this.getAttribute("server") || "", { prompt, image: image || null, scene: scene || null, seed });
    } catch (exc) {
      this._showError(exc, () => this.start({ prompt, image, seed, scene }));
      throw exc;
    }
    this._bind(session);
    try {
      await session.connect();
    } catch (exc) {
      this._showError(exc, () => this.start({ prompt, image, seed, scene }));
      this._unbind();
      session.end().catch(() => {}); // free the slot we took
      throw exc;
    }
    return session;
  }

  setPrompt(text) {
    return !!this.session && this.session.setPrompt(text);
  }

  async end() {
    const session = this.session;
    if (!session) return;
    await session.end();
  }

  _bind(session) {
    this.session = session;
    for (const type of ["frame", "stats", "error", "ended", "connectionstatechange"]) {
      session.addEventListener(type, (e) => this.dispatchEvent(new CustomEvent(type, { detail: e.detail, bubbles: true, composed: true })));
    }
    session.addEventListener("track", (e) => {
      this.video.srcObject = e.detail.stream;
      this.video.play().catch(() => {}); // muted autoplay is allowed; a refusal only delays the picture
    });
    // Only the current session may change the screen (a failed start ends its session quietly).
    const mine = (fn) => (e) => session === this.session && fn(e.detail);
    this._sawVideo = false;
    session.addEventListener("frame", mine(() => this._gotVideo()), { once: true });
    session.addEventListener("connectionstatechange", mine((d) => this._onState(d.state)));
    session.addEventListener("ended", mine((d) => this._onEnded(d.reason)));
    session.addEventListener("error", (e) => console.warn(`world stream: ${e.detail.code}: ${e.detail.message}`));
    this.hud.attach(session);
    this.hudRoot.hidden = false;
    const touch = isTouchDevice();
    this.touchBox.hidden = !touch;
    const parts = touch ? { joystick: this.shadowRoot.querySelector(".joystick"), knob: this.shadowRoot.querySelector(".knob"),
      lookPad: this.shadowRoot.querySelector(".lookpad") } : null;
    this.controls = new Controls(this.stage, (keys, motion) => session.sendInput(keys, motion), parts);
    this.dispatchEvent(new CustomEvent("started", { detail: { session }, bubbles: true, composed: true }));
  }

  _unbind() {
    if (this.controls) this.controls.destroy();
    this.controls = null;
    this.hud.detach();
    this.touchBox.hidden = true;
    clearTimeout(this._noVideoTimer);
    this.session = null;
    this._updateHint();
  }

  _onState(state) {
    if (state === "connected") {
      this._message(null);
      this.stage.focus({ preventScroll: true });
      if (!this._sawVideo) this._noVideoTimer = setTimeout(() => this._message(
        "Connected, but no video is arriving. This browser may not decode H.264 or VP8 video, or a firewall drops it."), NO_VIDEO_MS);
    } else if (state === "reconnecting") {
      this._message("Connection lost — reconnecting…");
    }
    this._updateHint();
  }

  _gotVideo() {
    this._sawVideo = true;
    clearTimeout(this._noVideoTimer);
    if (this.session && this.session.state === "connected") this._message(null);
  }

  _onEnded(reason) {
    this._unbind();
    this._message(ENDED_TEXT[reason] || `Session ended (${reason}).`);
  }

  _showError(exc, retry) {
    clearInterval(this._countdown);
    if (exc instanceof ServerError && exc.code === "server_full") {
      let left = exc.retryAfter ?? 10;
      const tick = () => {
        this._message(left > 0 ? `Server full — retry in ${left} s.` : "Server full — a slot may be free now.",
          { label: "Retry", action: retry, disabled: left > 0 });
        if (left-- <= 0) clearInterval(this._countdown);
      };
      tick();
      this._countdown = setInterval(tick, 1000);
      return;
    }
    this._message(exc.message || String(exc), { label: "Try again", action: retry });
  }

  _message(text, button = null) {
    if (!text) clearInterval(this._countdown);
    this.messageBox.hidden = !text;
    this.messageBox.querySelector("p").textContent = text || "";
    const btn = this.messageBox.querySelector("button");
    btn.hidden = !button;
    if (button) {
      btn.textContent = button.label;
      btn.disabled = !!button.disabled;
      btn.onclick = () => {
        clearInterval(this._countdown);
        button.action().catch(() => {});
      };
    }
  }

  _updateHint() {
    const active = !!this.controls;
    const focused = this.shadowRoot.activeElement === this.stage;
    this.hintBox.hidden = !active || isTouchDevice();
    if (this.controls && this.controls.pointerLocked) {
      this.hintBox.textContent = "WASD/arrows move · IJKL look & strafe · mouse looks · Esc frees the mouse";
    } else if (focused) {
      this.hintBox.textContent = "WASD/arrows move · IJKL look & strafe · click for mouse look";
    } else {
      this.hintBox.textContent = "Click the video to steer";
    }
  }
}

async function fetchImage(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot load the start image ${url}: HTTP ${response.status}`);
  return response.blob();
}

if (!customElements.get("world-stream")) customElements.define("world-stream", WorldStreamElement);
