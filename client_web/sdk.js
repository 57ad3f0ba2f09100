// A small SDK for one live SANA-WM session in the browser: create it over HTTP, connect over WebRTC,
// steer it over the `control` data channel, and survive network blips. No UI here (see world-stream.js).
//
//   import { createSession } from "./sdk.js";
//   const session = await createSession("https://host:8000", { prompt: "a quiet harbour at dusk" });
//   session.addEventListener("track", (e) => (video.srcObject = e.detail.stream));
//   session.addEventListener("frame", (e) => console.log(e.detail.index, e.detail.input_seq));
//   await session.connect();
//   session.sendInput(["w"]);            // held keys; repeated every 90 ms until the next call
//   session.sendInput([], { dx: 3 });    // release everything, turn right a little
//   await session.end();
//
// Events (CustomEvent, payload in `detail`): track {stream}, frame {index, pts, input_seq, latencyMs?},
// stats {fps, buffered_seconds, ...}, pong {t, rttMs}, error {code, message}, ended {reason},
// connectionstatechange {state: "connecting" | "connected" | "reconnecting" | "closed"}.

import { inputMessage, parseServerMessage, pingMessage, ProtocolError, promptMessage } from "./protocol.js";

const REPEAT_MS = 90; // held keys are re-sent this often (the protocol asks for at least every 100 ms)
const ICE_GATHER_MS = 3000; // the server has no trickle ICE: wait this long at most for all candidates
const DISCONNECT_WAIT_MS = 2500; // a "disconnected" peer connection often recovers by itself; wait first
const SENT_LOG = 512; // send times kept for this many recent input seqs (latency measurement)

/** A problem on the client's side: `code` is short and machine-readable. */
export class StreamError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** An error answered by the server (`status` 0: the server could not be reached). */
export class ServerError extends StreamError {
  constructor(status, code, message, retryAfter = null) {
    super(code, message);
    this.status = status;
    this.retryAfter = retryAfter; // seconds, from Retry-After (503 server_full)
  }
}

function apiUrl(server, path) {
  return new URL(path, server || window.location.href).toString();
}

async function call(server, method, path, { token, json } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(apiUrl(server, path), {
      method, headers, body: json === undefined ? undefined : JSON.stringify(json),
    });
  } catch (exc) {
    throw new ServerError(0, "unreachable", `cannot reach the server: ${exc.message}`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || {};
    const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
    throw new ServerError(response.status, error.code || `http_${response.status}`,
      error.message || response.statusText, Number.isFinite(retry) ? retry : null);
  }
  return body;
}

/** `GET /v1/info`: model, width, height, fps, chunk_frames, max_sessions, active_sessions, ... */
export function getInfo(server = "") {
  return call(server, "GET", "/v1/info");
}

async function imageToBase64(image) {
  if (image == null) return undefined;
  if (typeof image === "string") return image; // base64 or a data: URL; the server accepts both
  if (!(image instanceof Blob)) throw new StreamError("bad_image", "image must be a Blob/File or a base64 string");
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new StreamError("bad_image", "cannot read the image file"));
    reader.readAsDataURL(image);
  });
}

/** Check that this browser can receive the server's video at all (WebRTC, and H.264 or VP8). */
export function checkBrowser() {
  if (typeof RTCPeerConnection === "undefined") {
    throw new StreamError("no_webrtc", "this browser has no WebRTC (RTCPeerConnection); try a current Chrome, Firefox or Safari");
  }
  const caps = window.RTCRtpReceiver && RTCRtpReceiver.getCapabilities && RTCRtpReceiver.getCapabilities("video");
  if (caps && !caps.codecs.some((c) => /video\/(h264|vp8)/i.test(c.mimeType))) {
    throw new StreamError("codec_unsupported", "this browser cannot decode H.264 or VP8 video");
  }
}

/** `GET /v1/scenes`: the server's named start scenes, `[{id, title, width, height, prompt}]`. */
export function getScenes(server = "") {
  return call(server, "GET", "/v1/scenes");
}

/** The URL of a start scene's PNG (`GET /v1/scenes/{id}.png`). */
export function sceneUrl(server = "", id) {
  return `${server}/v1/scenes/${encodeURIComponent(id)}.png`;
}

/** `POST /v1/sessions`: a new session, not yet connected. `image`: Blob/File, data URL or base64; or
 * `scene`: the id of one of the server's start scenes (`getScenes`) instead of an image. */
export async function createSession(server = "", { prompt, image = null, scene = null, seed = 0, iceServers = [], graceMs = 30000 } = {}) {
  const json = { prompt, seed };
  const encoded = await imageToBase64(image);
  if (encoded !== undefined) json.image = encoded;
  if (scene != null) json.scene = scene;
  const created = await call(server, "POST", "/v1/sessions", { json });
  return new Session(server, created, { iceServers, graceMs });
}

export class Session extends EventTarget {
  constructor(server, { session_id, token, expires_in }, { iceServers = [], graceMs = 30000 } = {}) {
    super();
    this.server = server;
    this.id = session_id;
    this.token = token;
    this.expiresIn = expires_in;
    this.graceMs = graceMs; // how long to keep trying to reconnect (the server's --grace-period)
    this.iceServers = iceServers;
    this.state = "new";
    this.stream = null;
    this._pc = null;
    this._channel = null;
    this._seq = 0;
    this._held = [];
    this._repeat = null;
    this._sentAt = new Map(); // input seq -> performance.now() when sent
    this._lastShownSeq = -1;
    this._disconnectTimer = null;
    this._reconnecting = null;
    this._ended = false;
  }

  get path() {
    return `/v1/sessions/${encodeURIComponent(this.id)}`;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("connectionstatechange", { state });
  }

  /** Offer WebRTC and resolve once the control channel is open; throws StreamError / ServerError. */
  async connect({ timeoutMs = 20000 } = {}) {
    if (this._ended) throw new StreamError("session_ended", "the session has ended");
    checkBrowser();
    this._setState("connecting");
    await this._open(timeoutMs);
    this._setState("connected");
  }

  async _open(timeoutMs) {
    this._closePeer();
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    const channel = pc.createDataChannel("control"); // the server expects the client to create it
    this._pc = pc;
    this._channel = channel;
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (event) => {
      this.stream = event.streams[0] || new MediaStream([event.track]);
      this._emit("track", { stream: this.stream });
    };
    pc.onconnectionstatechange = () => this._onPeerState(pc);
    channel.onmessage = (event) => this._onMessage(event.data);
    const opened = new Promise((resolve, reject) => {
      channel.onopen = resolve;
      channel.onclose = () => {
        reject(new StreamError("channel_closed", "the control channel closed before it opened"));
        if (pc === this._pc && !this._ended) this._scheduleReconnect(0);
      };
    });
    opened.catch(() => {}); // awaited below; a close during signalling must not count as unhandled

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc, ICE_GATHER_MS);
    const answer = await call(this.server, "POST", `${this.path}/offer`, {
      token: this.token, json: { sdp: pc.localDescription.sdp, type: "offer" },
    });
    if (pc !== this._pc) throw new StreamError("superseded", "a newer connection replaced this one");
    await pc.setRemoteDescription(answer);
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new StreamError("connect_timeout",
        "no WebRTC connection to the server; a firewall may block UDP (the server may need --ice-server)")), timeoutMs);
    });
    try {
      await Promise.race([opened, timeout]);
    } finally {
      clearTimeout(timer);
    }
    if (this._held.length) this.sendInput(this._held); // the server released our keys on reconnect
  }

  _onPeerState(pc) {
    if (pc !== this._pc || this._ended) return;
    const state = pc.connectionState;
    clearTimeout(this._disconnectTimer);
    if (state === "connected" && this.state === "reconnecting" && !this._reconnecting) this._setState("connected");
    else if (state === "disconnected") this._scheduleReconnect(DISCONNECT_WAIT_MS);
    else if (state === "failed") this._scheduleReconnect(0);
  }

  _scheduleReconnect(delayMs) {
    clearTimeout(this._disconnectTimer);
    this._disconnectTimer = setTimeout(() => this.reconnect(), delayMs);
  }

  /** Offer again with the same token until it works, the session is gone, or the grace period passes.
   * Called by itself when the connection fails; call it after a known network change too. */
  reconnect() {
    if (this._ended || this._reconnecting || this.state === "connecting") return;
    this._setState("reconnecting");
    this._reconnecting = (async () => {
      const deadline = performance.now() + this.graceMs;
      for (let attempt = 0; !this._ended; attempt++) {
        try {
          await this._open(Math.min(10000, Math.max(1000, deadline - performance.now())));
          this._setState("connected");
          return;
        } catch (exc) {
          if (exc instanceof ServerError && [403, 404, 409].includes(exc.status)) {
            this._finish(exc.code === "session_ended" ? "ended" : exc.code);
            return;
          }
          if (performance.now() + 1000 > deadline) {
            this._emit("error", { code: "reconnect_failed", message: `could not reconnect: ${exc.message}` });
            this._finish("disconnected");
            return;
          }
          await new Promise((r) => setTimeout(r, Math.min(4000, 500 * 2 ** attempt)));
        }
      }
    })().finally(() => (this._reconnecting = null));
  }

  _onMessage(text) {
    let event;
    try {
      event = parseServerMessage(text);
    } catch (exc) {
      if (!(exc instanceof ProtocolError)) throw exc;
      console.warn("world stream: ignored server event:", exc.message);
      return;
    }
    if (event.type === "frame") {
      if (event.input_seq > this._lastShownSeq) {
        this._lastShownSeq = event.input_seq;
        const sent = this._sentAt.get(event.input_seq);
        if (sent !== undefined) event.latencyMs = performance.now() - sent;
      }
    } else if (event.type === "pong") {
      event.rttMs = performance.now() - event.t;
    } else if (event.type === "ended") {
      this._finish(event.reason);
      return;
    }
    this._emit(event.type, event);
  }

  get isOpen() {
    return !!this._channel && this._channel.readyState === "open";
  }

  _send(text) {
    if (!this.isOpen) return false;
    this._channel.send(text);
    return true;
  }

  /** Send the full set of held keys (w/s forward/back, a/d yaw, i/k pitch, j/l strafe) and look motion
   * since the last call; returns its seq, or null while not connected. While keys are held they are
   * re-sent every 90 ms, so call this only when something changes. */
  sendInput(keys, { dx = 0, dy = 0 } = {}) {
    this._held = [...keys];
    clearInterval(this._repeat);
    this._repeat = null;
    const seq = this._sendInput(dx, dy);
    if (this._held.length) this._repeat = setInterval(() => this._sendInput(0, 0), REPEAT_MS);
    return seq;
  }

  _sendInput(dx, dy) {
    const seq = this._seq;
    if (!this._send(inputMessage(seq, this._held, dx, dy))) return null;
    this._seq += 1;
    this._sentAt.set(seq, performance.now());
    if (this._sentAt.size > SENT_LOG) this._sentAt.delete(this._sentAt.keys().next().value);
    return seq;
  }

  /** The newest input seq sent so far (-1: none). */
  get lastSentSeq() {
    return this._seq - 1;
  }

  /** Change the text prompt from the next chunk on; returns false while not connected. */
  setPrompt(text) {
    return this._send(promptMessage(text));
  }

  /** Measure the round trip; the answer arrives as a `pong` event with `rttMs`. */
  ping() {
    return this._send(pingMessage(performance.now()));
  }

  /** `GET /v1/sessions/{id}`: state, frames_sent, seconds, latency_ms, ... */
  status() {
    return call(this.server, "GET", this.path, { token: this.token });
  }

  /** End the session on the server (its slot is freed) and close the connection. */
  async end() {
    if (this._ended) return;
    try {
      await call(this.server, "DELETE", this.path, { token: this.token });
    } finally {
      this._finish("deleted");
    }
  }

  _finish(reason) {
    if (this._ended) return;
    this._ended = true;
    clearInterval(this._repeat);
    clearTimeout(this._disconnectTimer);
    this._closePeer();
    this._setState("closed");
    this._emit("ended", { reason });
  }

  _closePeer() {
    const pc = this._pc;
    this._pc = null;
    this._channel = null;
    if (pc) pc.close();
  }
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, timeoutMs); // send what we have rather than hang on a slow STUN server
    function done() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check() {
      if (pc.iceGatheringState === "complete") done();
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}
