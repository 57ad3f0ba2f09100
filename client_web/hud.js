// The heads-up display of a live session: video fps, input->frame latency, buffered seconds, session time.
//
// fps counts frames the browser actually presented (requestVideoFrameCallback; `frame` messages where
// that is missing). Latency is the time from sending an input to the `frame` message of the first frame
// whose camera used it (the SDK's `latencyMs`); it excludes the last hop of decoding and display.
// The newest values are also written to the root's data-* attributes, for tests and page scripts.

const WINDOW_MS = 1000; // fps is counted over this trailing window
const LATENCY_SAMPLES = 8; // the display shows the median of this many recent latencies
const RENDER_MS = 250;
const SLOW_SPEED = 0.95; // below this share of real time (stats.speed) the HUD says the server is behind

export class Hud {
  constructor(root, video) {
    this.root = root;
    this.video = video;
    this.fields = Object.fromEntries([...root.querySelectorAll("[data-field]")].map((el) => [el.dataset.field, el]));
    this.session = null;
    this._reset();
  }

  _reset() {
    this.presented = []; // performance.now() of recent presented frames
    this.latencies = [];
    this.values = {
      fps: 0, latencyMs: null, bufferedSeconds: null, sessionSeconds: 0, frames: 0,
      inputSeq: -1, sentSeq: -1, speed: null, overloaded: false,
    };
    this.startedAt = null;
  }

  /** Follow `session` from now on (the previous one, if any, is dropped). */
  attach(session) {
    this.detach();
    this._reset();
    this.session = session;
    this._onFrame = (e) => {
      const { input_seq: seq, latencyMs } = e.detail;
      this.values.frames += 1;
      this.values.inputSeq = seq;
      if (!this._useVideoFrames) this.presented.push(performance.now());
      if (latencyMs !== undefined) {
        this.latencies.push(latencyMs);
        if (this.latencies.length > LATENCY_SAMPLES) this.latencies.shift();
      }
    };
    this._onStats = (e) => {
      this.values.bufferedSeconds = e.detail.buffered_seconds;
      this.values.speed = e.detail.speed ?? null;
      this.values.overloaded = !!e.detail.overloaded;
    };
    this._onState = (e) => {
      if (e.detail.state === "connected" && this.startedAt === null) this.startedAt = performance.now();
    };
    session.addEventListener("frame", this._onFrame);
    session.addEventListener("stats", this._onStats);
    session.addEventListener("connectionstatechange", this._onState);
    this._useVideoFrames = "requestVideoFrameCallback" in HTMLVideoElement.prototype;
    if (this._useVideoFrames) this._watchVideo();
    this._timer = setInterval(() => this.render(), RENDER_MS);
  }

  _watchVideo() {
    const video = this.video;
    const session = this.session;
    const onFrame = () => {
      if (this.session !== session) return;
      this.presented.push(performance.now());
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  detach() {
    clearInterval(this._timer);
    if (!this.session) return;
    this.session.removeEventListener("frame", this._onFrame);
    this.session.removeEventListener("stats", this._onStats);
    this.session.removeEventListener("connectionstatechange", this._onState);
    this.session = null;
    this.render();
  }

  render() {
    const now = performance.now();
    while (this.presented.length && this.presented[0] < now - WINDOW_MS) this.presented.shift();
    const v = this.values;
    v.fps = this.presented.length * (1000 / WINDOW_MS);
    const sorted = [...this.latencies].sort((a, b) => a - b);
    v.latencyMs = sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
    v.sessionSeconds = this.startedAt === null ? 0 : (now - this.startedAt) / 1000;
    if (this.session) v.sentSeq = this.session.lastSentSeq;

    const minutes = Math.floor(v.sessionSeconds / 60);
    const seconds = String(Math.floor(v.sessionSeconds % 60)).padStart(2, "0");
    this._show("fps", v.fps.toFixed(0));
    this._show("latency", v.latencyMs === null ? "–" : `${v.latencyMs.toFixed(0)} ms`);
    this._show("buffer", v.bufferedSeconds === null ? "–" : `${v.bufferedSeconds.toFixed(2)} s`);
    this._show("time", `${minutes}:${seconds}`);
    const slow = v.speed !== null && v.speed < SLOW_SPEED;
    this._show("warning", v.overloaded || slow ? `server busy${slow ? ` · ${v.speed.toFixed(2)}× speed` : ""}` : "");
    const data = this.root.dataset;
    data.fps = v.fps.toFixed(1);
    data.latencyMs = v.latencyMs === null ? "" : v.latencyMs.toFixed(1);
    data.bufferedSeconds = v.bufferedSeconds ?? "";
    data.inputSeq = v.inputSeq;
    data.sentSeq = v.sentSeq;
    data.frames = v.frames;
  }

  _show(field, text) {
    if (this.fields[field]) this.fields[field].textContent = text;
  }
}
