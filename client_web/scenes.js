// Sample start scenes painted procedurally on a canvas, so nothing binary ships or downloads: what the page
// offers when the server lists no start scenes of its own (GET /v1/scenes). Each is deterministic (a seeded
// random generator), so a scene always gives the same start image.

export const SCENE_WIDTH = 640; // 16:8.8, the aspect of the released model's 1280x704 video
export const SCENE_HEIGHT = 352;

function random(seed) {
  // mulberry32: a tiny seeded generator, good enough for scattering clouds and windows
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function gradient(ctx, y0, y1, stops) {
  const g = ctx.createLinearGradient(0, y0, 0, y1);
  stops.forEach(([at, color]) => g.addColorStop(at, color));
  return g;
}

function ridge(ctx, w, h, baseY, amplitude, waves, phase, fill) {
  ctx.beginPath();
  ctx.moveTo(0, h);
  for (let x = 0; x <= w; x += 4) {
    const y = baseY + waves.reduce((sum, [freq, amp], i) => sum + amp * amplitude * Math.sin((x / w) * freq * Math.PI * 2 + phase * (i + 1)), 0);
    ctx.lineTo(x, y);
  }
  ctx.lineTo(w, h);
  ctx.closePath();
  ctx.fillStyle = fill;
  ctx.fill();
}

function meadow(ctx, w, h, rnd) {
  ctx.fillStyle = gradient(ctx, 0, h * 0.6, [[0, "#3d7fd9"], [1, "#bfe0ff"]]);
  ctx.fillRect(0, 0, w, h);
  for (let i = 0; i < 7; i++) { // clouds: clusters of soft ellipses
    const cx = rnd() * w, cy = 30 + rnd() * h * 0.3;
    ctx.fillStyle = "rgba(255,255,255,0.85)";
    for (let j = 0; j < 5; j++) {
      ctx.beginPath();
      ctx.ellipse(cx + (j - 2) * 18 + rnd() * 10, cy + rnd() * 10, 26 + rnd() * 14, 12 + rnd() * 8, 0, 0, Math.PI * 2);
      ctx.fill();
    }
  }
  ridge(ctx, w, h, h * 0.55, 18, [[1.5, 1], [3.1, 0.4]], 0.3, "#6f9f5a");
  ridge(ctx, w, h, h * 0.66, 14, [[1.1, 1], [4.3, 0.3]], 1.7, "#4f8f3a");
  ctx.fillStyle = gradient(ctx, h * 0.7, h, [[0, "#4a9a32"], [1, "#2f6f1f"]]);
  ctx.fillRect(0, h * 0.78, w, h * 0.22);
  const colors = ["#ffe14d", "#ffffff", "#ff6fa8", "#b18cff"];
  for (let i = 0; i < 260; i++) { // flowers, denser and larger toward the viewer
    const y = h * 0.7 + rnd() ** 0.7 * h * 0.3;
    ctx.fillStyle = colors[Math.floor(rnd() * colors.length)];
    ctx.fillRect(rnd() * w, y, 1 + (y / h) * 3, 1 + (y / h) * 3);
  }
}

function desert(ctx, w, h, rnd) {
  ctx.fillStyle = gradient(ctx, 0, h * 0.6, [[0, "#f0a25a"], [0.6, "#ffd59a"], [1, "#fff0d0"]]);
  ctx.fillRect(0, 0, w, h);
  ctx.fillStyle = "rgba(255,250,220,0.95)";
  ctx.beginPath();
  ctx.arc(w * 0.72, h * 0.28, 28, 0, Math.PI * 2);
  ctx.fill();
  const shades = ["#e2a868", "#d4924f", "#c47d3e", "#b06a30"];
  shades.forEach((fill, i) => ridge(ctx, w, h, h * (0.5 + i * 0.12), 16 - i * 2, [[0.8 + i * 0.4, 1], [2.2, 0.35]], rnd() * 6, fill));
  ctx.strokeStyle = "rgba(120,70,30,0.25)"; // wind ripples on the nearest dune
  for (let i = 0; i < 40; i++) {
    const y = h * 0.85 + rnd() * h * 0.15, x = rnd() * w;
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.quadraticCurveTo(x + 20, y - 4, x + 40, y);
    ctx.stroke();
  }
}

function nightCity(ctx, w, h, rnd) {
  ctx.fillStyle = gradient(ctx, 0, h, [[0, "#060a1f"], [0.7, "#1b2350"], [1, "#3a2a55"]]);
  ctx.fillRect(0, 0, w, h);
  for (let i = 0; i < 120; i++) {
    ctx.fillStyle = `rgba(255,255,255,${0.3 + rnd() * 0.7})`;
    ctx.fillRect(rnd() * w, rnd() * h * 0.45, 1, 1);
  }
  ctx.fillStyle = "#f4f1d8";
  ctx.beginPath();
  ctx.arc(w * 0.15, h * 0.18, 16, 0, Math.PI * 2);
  ctx.fill();
  for (const [layer, tone] of [[0, "#10142e"], [1, "#0a0c1c"]]) { // far, then near buildings
    for (let x = -10; x < w;) {
      const bw = 24 + rnd() * 40, bh = h * (0.25 + rnd() * 0.4) + layer * 30;
      const top = h - bh;
      ctx.fillStyle = tone;
      ctx.fillRect(x, top, bw, bh);
      for (let wy = top + 6; wy < h - 6; wy += 9) {
        for (let wx = x + 4; wx < x + bw - 4; wx += 7) {
          if (rnd() < 0.35) {
            ctx.fillStyle = rnd() < 0.8 ? "#ffd77a" : "#7ad7ff";
            ctx.fillRect(wx, wy, 3, 4);
          }
        }
      }
      x += bw + 2 + rnd() * 6;
    }
  }
  ctx.fillStyle = gradient(ctx, h * 0.92, h, [[0, "rgba(255,120,60,0)"], [1, "rgba(255,120,60,0.35)"]]);
  ctx.fillRect(0, h * 0.92, w, h * 0.08);
}

export const SCENES = Object.freeze([
  { id: "meadow", name: "Sky and meadow", prompt: "A sunny meadow full of wildflowers under a blue sky with drifting clouds, gentle green hills in the distance", draw: meadow, seed: 7 },
  { id: "desert", name: "Desert", prompt: "Golden sand dunes in a vast desert at late afternoon, a bright sun low in a warm hazy sky", draw: desert, seed: 11 },
  { id: "night-city", name: "Night city", prompt: "A city skyline at night with lit windows in tall buildings, stars and a full moon above", draw: nightCity, seed: 23 },
]);

/** Paint `scene` on a new canvas of the given size. */
export function renderScene(scene, width = SCENE_WIDTH, height = SCENE_HEIGHT) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.scale(width / SCENE_WIDTH, height / SCENE_HEIGHT);
  scene.draw(ctx, SCENE_WIDTH, SCENE_HEIGHT, random(scene.seed));
  ctx.restore();
  return canvas;
}

/** The scene as a PNG Blob, ready to upload as a start image. */
export function sceneImage(scene) {
  return new Promise((resolve) => renderScene(scene).toBlob(resolve, "image/png"));
}
