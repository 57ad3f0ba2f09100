// The control protocol of a live session, the browser's side (stream_server/protocol.py is the server's).
// The same JSON text messages travel on the `control` data channel and on the WebSocket fallback.
// Outgoing messages are built here only; incoming events are checked strictly and refused, never patched.

export const KEYS = Object.freeze(["w", "a", "s", "d", "i", "j", "k", "l"]);
export const MAX_PROMPT_CHARS = 2000;
export const MAX_MOUSE_STEPS = 1000; // |dx|, |dy| per message; the server refuses more

export class ProtocolError extends Error {}

/** `keys`: held DSL letters; `dx`/`dy`: look motion since the last input, in camera rotation steps
 * (1.0 turns as far as one frame of a held `d` / `i`; +dx turns right, +dy looks up). */
export function inputMessage(seq, keys, dx = 0, dy = 0) {
  if (!Number.isSafeInteger(seq) || seq < 0) throw new ProtocolError(`input seq must be a non-negative integer; got ${seq}`);
  const unknown = [...keys].filter((k) => !KEYS.includes(k));
  if (unknown.length) throw new ProtocolError(`unknown keys ${unknown}; allowed: ${KEYS.join("")}`);
  const clamp = (v) => Math.max(-MAX_MOUSE_STEPS, Math.min(MAX_MOUSE_STEPS, Number.isFinite(v) ? v : 0));
  return JSON.stringify({ type: "input", seq, keys: [...new Set(keys)].sort(), mouse: { dx: clamp(dx), dy: clamp(dy) } });
}

export function promptMessage(text) {
  if (typeof text !== "string" || !text.trim()) throw new ProtocolError("the prompt must not be empty");
  if (text.length > MAX_PROMPT_CHARS) throw new ProtocolError(`the prompt has ${text.length} characters; the limit is ${MAX_PROMPT_CHARS}`);
  return JSON.stringify({ type: "prompt", text });
}

export function pingMessage(t) {
  return JSON.stringify({ type: "ping", t });
}

// Required fields of each server event and their JS types ("number?" allows null).
const EVENT_FIELDS = {
  frame: { index: "number", pts: "number", input_seq: "number" },
  stats: { fps: "number", buffered_seconds: "number" },
  pong: { t: "number" },
  error: { code: "string", message: "string" },
  ended: { reason: "string" },
};

/** Parse one server event; throws ProtocolError saying what is wrong. Extra fields are kept. */
export function parseServerMessage(text) {
  if (typeof text !== "string") throw new ProtocolError("server events are JSON text");
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    throw new ProtocolError("server event is not valid JSON");
  }
  const fields = event && EVENT_FIELDS[event.type];
  if (!fields) throw new ProtocolError(`unknown server event type ${JSON.stringify(event && event.type)}`);
  for (const [name, type] of Object.entries(fields)) {
    if (typeof event[name] !== type) throw new ProtocolError(`${event.type} event: ${name} must be a ${type}`);
  }
  return event;
}
