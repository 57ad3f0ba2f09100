"""The control protocol of a live session, defined once: client messages in, server events out.

The same JSON text messages travel on the WebRTC data channel labelled ``control`` and on the WebSocket
fallback (``/v1/sessions/{id}/ws``). Client messages are validated strictly: a message that is not
exactly one of the shapes below is refused with a :class:`ProtocolError` (sent back as an ``error``
event) and never patched up; the session carries on untouched.

Client -> server::

    {"type": "input", "seq": int, "keys": ["w", ...], "mouse": {"dx": float, "dy": float}}
    {"type": "prompt", "text": str}
    {"type": "ping", "t": float}

``keys`` is the full set held now (letters of :data:`world_model.controls.KEYS`); ``mouse`` is optional
and is the look motion since the previous input message, in camera rotation steps (1.0 turns as far as
one frame of a held ``d`` / ``i``; +dx turns right, +dy looks up). ``seq`` must not go backwards.

Server -> client: ``frame``, ``stats``, ``pong``, ``error`` and ``ended`` (builders below).
This module imports neither aiohttp, aiortc nor torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from world_model.controls import KEYS

MAX_MESSAGE_CHARS = 16_384  # longer control messages are refused before parsing
MAX_PROMPT_CHARS = 2_000  # prompts longer than this are refused (the text encoder truncates anyway)
MAX_MOUSE_STEPS = 1_000.0  # |dx|, |dy| above this per message is a client bug, not a mouse
MAX_SEQ = 2**53  # JavaScript's largest exact integer


class ProtocolError(ValueError):
    """A refused client message; ``code`` is a short machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InputMessage:
    seq: int
    keys: frozenset[str]
    mouse_dx: float
    mouse_dy: float


@dataclass(frozen=True)
class PromptMessage:
    text: str


@dataclass(frozen=True)
class PingMessage:
    t: float


ClientMessage = InputMessage | PromptMessage | PingMessage


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError("bad_message", f"{what} must be a finite number; got {value!r}")
    return float(value)


def _fields(obj: dict[str, Any], kind: str, required: set[str], optional: set[str] = frozenset()) -> None:
    missing = required - obj.keys()
    unknown = obj.keys() - required - optional - {"type"}
    if missing:
        raise ProtocolError("bad_message", f"{kind} message lacks {sorted(missing)}")
    if unknown:
        raise ProtocolError("bad_message", f"{kind} message has unknown fields {sorted(unknown)}")


def _parse_input(obj: dict[str, Any]) -> InputMessage:
    _fields(obj, "input", {"seq", "keys"}, {"mouse"})
    seq = obj["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise ProtocolError("bad_message", f"input seq must be an integer in [0, 2^53]; got {seq!r}")
    keys = obj["keys"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ProtocolError("bad_message", "input keys must be a list of strings")
    unknown = sorted(set(keys) - KEYS)
    if unknown:
        raise ProtocolError("bad_message", f"unknown keys {unknown}; allowed: {''.join(sorted(KEYS))}")
    dx = dy = 0.0
    if "mouse" in obj:
        mouse = obj["mouse"]
        if not isinstance(mouse, dict) or set(mouse) != {"dx", "dy"}:
            raise ProtocolError("bad_message", 'input mouse must be {"dx": number, "dy": number}')
        dx, dy = _number(mouse["dx"], "mouse.dx"), _number(mouse["dy"], "mouse.dy")
        if max(abs(dx), abs(dy)) > MAX_MOUSE_STEPS:
            raise ProtocolError("bad_message", f"mouse motion above {MAX_MOUSE_STEPS:g} steps in one message")
    return InputMessage(seq=seq, keys=frozenset(keys), mouse_dx=dx, mouse_dy=dy)


def _parse_prompt(obj: dict[str, Any]) -> PromptMessage:
    _fields(obj, "prompt", {"text"})
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("bad_message", "prompt text must be a non-empty string")
    if len(text) > MAX_PROMPT_CHARS:
        raise ProtocolError("prompt_too_long", f"prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return PromptMessage(text=text)


def _parse_ping(obj: dict[str, Any]) -> PingMessage:
    _fields(obj, "ping", {"t"})
    return PingMessage(t=_number(obj["t"], "ping t"))


_PARSERS = {"input": _parse_input, "prompt": _parse_prompt, "ping": _parse_ping}


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one client message; raises :class:`ProtocolError` saying what is wrong."""
    if not isinstance(text, str):
        raise ProtocolError("bad_message", "control messages are JSON text, not binary")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ProtocolError("message_too_long", f"control messages are limited to {MAX_MESSAGE_CHARS} characters")
    try:
        obj = json.loads(text)
    except ValueError:
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("bad_message", 'message must be a JSON object with a string "type"')
    parser = _PARSERS.get(obj["type"])
    if parser is None:
        raise ProtocolError("unknown_type", f"unknown message type {obj['type']!r}; expected one of {sorted(_PARSERS)}")
    return parser(obj)


def encode(event: dict[str, Any]) -> str:
    """Serialise a server event (compact JSON)."""
    return json.dumps(event, separators=(",", ":"))


def frame_event(index: int, pts: int, input_seq: int) -> dict[str, Any]:
    return {"type": "frame", "index": index, "pts": pts, "input_seq": input_seq}


def pong_event(t: float) -> dict[str, Any]:
    return {"type": "pong", "t": t}


def error_event(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def ended_event(reason: str) -> dict[str, Any]:
    return {"type": "ended", "reason": reason}


def stats_event(
    *, fps: float, buffered_seconds: float, chunk_ms: float | None, queue_position: int, sessions: int,
    overloaded: bool, speed: float, late_chunks: int,
) -> dict[str, Any]:
    """``speed``: content seconds delivered per wall second lately (1.0 = real time, below = slowed)."""
    return {
        "type": "stats",
        "fps": round(fps, 2),
        "buffered_seconds": round(buffered_seconds, 3),
        "chunk_ms": None if chunk_ms is None else round(chunk_ms, 1),
        "queue_position": queue_position,
        "sessions": sessions,
        "overloaded": overloaded,
        "speed": round(speed, 3),
        "late_chunks": late_chunks,
    }
