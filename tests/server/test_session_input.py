"""A session's input bookkeeping: latency counts from the key change, not from the client's re-sends."""

from __future__ import annotations

import json

from stream_server.sessions import FramePacket, Session


def _session() -> Session:
    session = Session(prompt="x", seed=0, image=None, fps=16, now=0.0, queue_frames=64)
    session.send = lambda event: None  # no channel attached
    return session


def _input(session: Session, seq: int, keys: list[str], now: float) -> None:
    assert session.handle_message(json.dumps({"type": "input", "seq": seq, "keys": keys, "mouse": {"dx": 0, "dy": 0}}), now) == []


def test_resent_keys_keep_the_time_of_the_change():
    session = _session()
    _input(session, 0, ["w"], now=1.0)
    _input(session, 1, ["w"], now=1.1)  # the client repeats held keys
    _input(session, 2, ["w"], now=1.2)
    chunk = session.next_chunk_input(24)
    assert chunk.input_seq == 2 and chunk.input_time == 1.0
    latency = session.frame_shown(FramePacket(0, None, chunk.input_seq, chunk.input_time), pts=0, now=2.0)
    assert latency == 1.0

    _input(session, 3, ["w"], now=2.1)  # still the same press: the next chunk adds no latency sample
    again = session.next_chunk_input(24)
    assert session.frame_shown(FramePacket(24, None, again.input_seq, again.input_time), pts=0, now=3.5) is None

    _input(session, 4, ["w", "d"], now=3.6)  # a new key: a new sample, from its own time
    turn = session.next_chunk_input(24)
    assert turn.input_time == 3.6
    assert abs(session.frame_shown(FramePacket(48, None, turn.input_seq, turn.input_time), pts=0, now=4.0) - 0.4) < 1e-9
    assert len(session.latencies) == 2
