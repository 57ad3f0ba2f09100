// The page served at `/`: a start screen (prompt, start image, samples, seed), then the live world in a
// <world-stream> element with prompt changes, an end button and, where the server keeps replays, a
// replay panel. All streaming logic lives in world-stream.js and sdk.js.
//
// The samples are the server's start scenes (GET /v1/scenes: what its model knows; a session names one
// instead of uploading it); a server without that endpoint gets the canvas-painted scenes of scenes.js.

import { SCENES, renderScene, sceneImage } from "./scenes.js";
import { getInfo, getScenes, sceneUrl } from "./sdk.js";
import "./world-stream.js";

const MAX_IMAGE_SIDE = 2048; // larger uploads are scaled down here: the model works at 1280x704 at most
const REPLAY_POLL_MS = 2000;

const $ = (id) => document.getElementById(id);
const world = $("world");
window.worldStream = world; // for page scripts and the browser tests

let info = null;
let image = null; // the chosen start image (Blob), or null
let scene = null; // or the id of the chosen server start scene; both null: the model's default scene
let lastSession = null; // the newest session started here (the replay panel follows it)

// -- start screen ---------------------------------------------------------------------------------------
/** Choose the start image: an image `blob`, a server scene id (`sceneId`), or neither; `sample` marks its button. */
function choose({ blob = null, sceneId = null, sample = null } = {}) {
  image = blob;
  scene = sceneId;
  const preview = $("image-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  const src = blob ? URL.createObjectURL(blob) : sceneId ? sceneUrl("", sceneId) : null;
  preview.hidden = !src;
  if (src) preview.src = src;
  $("clear-image").hidden = !src;
  for (const button of document.querySelectorAll(".sample")) button.classList.toggle("selected", button.dataset.scene === sample);
}

async function chooseFile(file) {
  $("start-error").textContent = "";
  if (!file) return;
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    $("start-error").textContent = `"${file.name}" is not a PNG or JPEG image.`;
    return;
  }
  try {
    choose({ blob: await shrink(file) });
  } catch {
    $("start-error").textContent = `"${file.name}" cannot be read as an image.`;
  }
}

/** Scale an image down to MAX_IMAGE_SIDE on its long side (re-encoded as JPEG); small ones pass as they are. */
async function shrink(file) {
  const bitmap = await createImageBitmap(file);
  const scale = MAX_IMAGE_SIDE / Math.max(bitmap.width, bitmap.height);
  if (scale >= 1) return file;
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
}

function addSample(id, title, picture, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "sample";
  button.dataset.scene = id;
  button.append(picture, Object.assign(document.createElement("span"), { textContent: title }));
  button.addEventListener("click", onClick);
  $("samples").append(button);
}

async function buildSamples() {
  let served = [];
  try {
    served = await getScenes();
  } catch {
    // an older server, or a failure: the canvas scenes below
  }
  if (Array.isArray(served) && served.length) {
    for (const s of served) {
      const picture = Object.assign(document.createElement("img"), { src: sceneUrl("", s.id), alt: "", width: 160, height: 88 });
      addSample(s.id, s.title, picture, () => {
        if (s.prompt) $("prompt").value = s.prompt;
        choose({ sceneId: s.id, sample: s.id });
      });
    }
    return;
  }
  for (const s of SCENES) {
    addSample(s.id, s.name, renderScene(s, 160, 88), async () => {
      $("prompt").value = s.prompt;
      choose({ blob: await sceneImage(s), sample: s.id });
    });
  }
}

function wireDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
  $("image-file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  $("clear-image").addEventListener("click", () => choose());
}

// -- playing --------------------------------------------------------------------------------------------
function showScreen(playing) {
  $("start-screen").hidden = playing;
  $("play-screen").hidden = !playing;
}

async function start() {
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    $("start-error").textContent = "Describe the world first (or pick a sample scene).";
    return;
  }
  $("start-error").textContent = "";
  const seed = Number.parseInt($("seed").value || "0", 10);
  $("live-prompt").value = "";
  $("end-button").hidden = false;
  $("new-button").hidden = true;
  $("replay-panel").hidden = true;
  showScreen(true);
  try {
    await world.start({ prompt, image, scene, seed });
  } catch {
    $("end-button").hidden = true; // the element shows what went wrong, with a retry button
    $("new-button").hidden = false;
  }
}

world.addEventListener("started", (e) => {
  lastSession = e.detail.session;
  $("end-button").hidden = false;
  $("new-button").hidden = true;
});

world.addEventListener("ended", () => {
  $("end-button").hidden = true;
  $("new-button").hidden = false;
  if (info && info.replays) followReplay(lastSession);
});

async function followReplay(session) {
  const panel = $("replay-panel");
  panel.hidden = false;
  const token = encodeURIComponent(session.token);
  const base = `/v1/replays/${encodeURIComponent(session.id)}`;
  for (;;) {
    let replay;
    try {
      const response = await fetch(base, { headers: { Authorization: `Bearer ${session.token}` } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      replay = await response.json();
    } catch (exc) {
      $("replay-state").textContent = `No replay for this session (${exc.message}).`;
      return;
    }
    if (lastSession !== session) return; // a newer session took over the panel
    const previewOnly = replay.state === "done" && replay.refined === false; // no refiner for the model
    $("replay-state").textContent = previewOnly ? `Replay ready, live quality only (${replay.reason}).`
      : replay.state === "done" ? "Replay ready." : replay.state === "failed"
      ? "The replay could not be made." : `Replay ${replay.state}: ${Math.round(100 * (replay.progress || 0))}%`;
    if (replay.state === "done") {
      $("replay-preview").href = `${base}/preview.mp4?token=${token}`;
      $("replay-refined").href = `${base}/refined.mp4?token=${token}`;
      $("replay-refined-item").hidden = previewOnly;
      $("replay-links").hidden = false;
      return;
    }
    if (replay.state === "failed") return;
    await new Promise((r) => setTimeout(r, REPLAY_POLL_MS));
  }
}

$("prompt-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("live-prompt").value.trim();
  if (text && world.setPrompt(text)) $("live-prompt").placeholder = `Prompt: ${text}`;
  $("live-prompt").value = "";
});
$("end-button").addEventListener("click", () => world.end().catch(() => {}));
$("new-button").addEventListener("click", () => showScreen(false));
$("start-button").addEventListener("click", start);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) start();
});

buildSamples();
wireDropZone();
getInfo().then((got) => {
  info = got;
  $("server-info").textContent = `${info.model} · ${info.width}×${info.height} @ ${info.fps} fps · ${info.active_sessions}/${info.max_sessions} sessions`;
}).catch((exc) => {
  $("server-info").textContent = `server unreachable: ${exc.message}`;
});
