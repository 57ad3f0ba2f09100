"""Live sessions first: the engine loop's published next-step time gates the refine worker's blocks.

A fake wall clock drives both sides: the publisher writes the next live step's start, the worker's gate
returns only when a block of its estimated length fits before it, and otherwise sleeps past it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from stream_server.gate import GATE_NAME, BlockTimer, DeviceGate, GatePublisher
from stream_server.jobs import JobQueue
from stream_server.recording import RecordingStore
from stream_server.refining import RefineWorker

from .helpers import CHUNK_FRAMES, count_frames, identity_refine, write_recording


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_publisher_writes_wall_times_and_none_when_idle(tmp_path):
    mono, wall = Clock(5.0), Clock(1000.0)
    publisher = GatePublisher(tmp_path, clock=mono, wall=wall)
    publisher.publish(5.75)  # the next live step in 0.75 s
    assert json.loads((tmp_path / GATE_NAME).read_text()) == {"idle_until": 1000.75, "written": 1000.0}
    publisher.publish(None)
    assert json.loads((tmp_path / GATE_NAME).read_text())["idle_until"] is None


def test_the_gate_waits_until_a_block_fits_before_the_next_live_step(tmp_path):
    wall = Clock(1000.0)
    slept = []

    def sleep(seconds):  # the engine loop runs its step, then publishes the next window
        slept.append(seconds)
        wall.t += seconds
        GatePublisher(tmp_path, clock=lambda: 0.0, wall=wall).publish(1.2)  # a 1.2 s gap from now on

    GatePublisher(tmp_path, clock=lambda: 0.0, wall=wall).publish(0.3)  # a live step due in 0.3 s
    gate = DeviceGate(tmp_path, wall=wall, sleep=sleep)
    gate.wait_turn(1.0)  # does not fit in 0.3 s: wait past that step
    assert len(slept) == 1 and slept[0] == pytest.approx(0.35) and gate.waited_seconds == pytest.approx(0.35)
    gate.wait_turn(1.0)  # fits in the 1.2 s gap now
    assert len(slept) == 1


def test_no_server_or_no_live_session_means_go(tmp_path):
    wall = Clock(1000.0)
    never = lambda seconds: pytest.fail("must not wait")
    DeviceGate(tmp_path, wall=wall, sleep=never).wait_turn(5.0)  # no gate file
    GatePublisher(tmp_path, clock=lambda: 0.0, wall=wall).publish(None)
    DeviceGate(tmp_path, wall=wall, sleep=never).wait_turn(5.0)  # no live session waiting
    GatePublisher(tmp_path, clock=lambda: 0.0, wall=wall).publish(0.0)
    wall.t += 30.0  # the server stopped publishing long ago
    DeviceGate(tmp_path, wall=wall, sleep=never).wait_turn(5.0)


def test_block_timer_is_cautious():
    timer = BlockTimer(prior_seconds=0.5)
    assert timer.estimate() == pytest.approx(0.625)
    timer.record(2.0)
    assert timer.estimate() == pytest.approx(2.5)


def test_the_worker_computes_each_block_only_after_its_turn(tmp_path):
    write_recording(tmp_path, "session-0123456789", "tok", chunks=3)  # blocks of frames 0-3, 4-6, 7-9
    events = []

    class Gate:
        def wait_turn(self, estimate):
            events.append(("turn", estimate))

    def refine(latents, prompt, **kw):
        for block in identity_refine(latents, prompt, **kw):
            events.append(("block", block.shape[2]))
            yield block

    from world_model.vae import VideoVAE

    worker = RefineWorker(RecordingStore(tmp_path), JobQueue(tmp_path), refine, VideoVAE.from_preset("tiny", seed=0),
                          model="tiny", gate=Gate())
    assert worker.run() == 1
    kinds = [kind for kind, _ in events]
    assert kinds == ["turn", "block", "turn", "block", "turn", "block", "turn"]  # a turn before each block (and the end)
    assert events[0][1] == pytest.approx(0.625) and events[2][1] != events[0][1]  # the estimate learns the block time
    assert count_frames(tmp_path / "sessions" / "session-0123456789" / "refined.mp4") == 3 * CHUNK_FRAMES


def test_a_busy_server_holds_the_worker_back(tmp_path):
    """With a live step always due, the worker refines nothing; once the server goes idle it finishes."""
    write_recording(tmp_path, "session-0123456789", "tok", chunks=2)
    from world_model.vae import VideoVAE

    publisher = GatePublisher(tmp_path)
    publisher.publish(time.monotonic())  # a live step due now, as while steps run back to back
    gate = DeviceGate(tmp_path, poll_seconds=0.02)
    worker = RefineWorker(RecordingStore(tmp_path), JobQueue(tmp_path), identity_refine, VideoVAE.from_preset("tiny", seed=0),
                          model="tiny", gate=gate)
    result = []
    thread = threading.Thread(target=lambda: result.append(worker.run()))
    thread.start()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # keep the server "busy" for a second
        publisher.publish(time.monotonic())
        time.sleep(0.02)
    assert JobQueue(tmp_path).get("session-0123456789").progress == 0.0 and thread.is_alive()
    publisher.publish(None)  # the live sessions ended
    thread.join(30)
    assert result == [1] and gate.waited_seconds > 0.5
