"""Live sessions first: the engine loop's published next-step time gates the refine worker's forwards and decodes.

A fake wall clock drives both sides: the publisher writes the next live step's start, the worker's gate
returns only when a unit of work of its estimated length fits before it, and otherwise sleeps past it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from stream_server.gate import GATE_NAME, DeviceGate, GatePublisher, Pacer, UnitTimer
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


def test_unit_timer_is_cautious():
    timer = UnitTimer(prior_seconds=0.5)
    assert timer.estimate() == pytest.approx(0.625)
    timer.record(2.0)
    assert timer.estimate() == pytest.approx(2.5)


def test_the_pacer_times_each_kind_of_unit_after_the_device_finished_it():
    clock, synced, asked = Clock(0.0), [], []

    class Gate:
        def wait_turn(self, estimate):
            asked.append(estimate)

    pacer = Pacer(Gate(), sync=lambda: synced.append(clock.t), clock=clock)
    pacer("forward")  # nothing ran before: prior estimates
    clock.t += 0.2
    pacer("forward")  # the first forward took 0.2 s
    clock.t += 0.2
    pacer("decode")
    clock.t += 0.05
    pacer("forward")  # the decode took 0.05 s; forwards are still estimated from forwards
    pacer.finish()
    assert synced == [0.0, 0.2, 0.4, 0.45]  # the device was waited for before every unit was timed
    assert asked == [pytest.approx(0.625), pytest.approx(0.25), pytest.approx(0.625), pytest.approx(0.25)]
    assert pacer.timers["decode"].estimate() == pytest.approx(0.0625)


def test_the_worker_waits_for_a_turn_before_each_forward_and_decode(tmp_path):
    """The real tiny refiner: four forwards per block (three denoising steps and the capture) and one decode."""
    write_recording(tmp_path, "session-0123456789", "tok", chunks=3)  # blocks of frames 0, 1-3, 4-6, 7-9
    from world_model.refiner import Refiner
    from world_model.vae import VideoVAE

    events = []

    class Gate:
        def wait_turn(self, estimate):
            events.append(estimate)

    refiner = Refiner.from_preset("tiny", 0, torch.float32, "cpu")
    vae = VideoVAE.from_preset("tiny", seed=0)
    worker = RefineWorker(RecordingStore(tmp_path), JobQueue(tmp_path), refiner.refine_blocks, vae, model="tiny", gate=Gate())
    kinds = []
    worker.pacer = _Recorder(worker.pacer, kinds)
    assert worker.run() == 1
    # frame 0 as is (decode only), the sink capture, then per block 4 forwards and a decode
    assert kinds == ["decode", "forward"] + ["forward"] * 4 + ["decode"] + (["forward"] * 4 + ["decode"]) * 2
    assert len(events) == len(kinds) and events[0] == pytest.approx(0.625) and events[-1] != pytest.approx(0.625)
    assert count_frames(tmp_path / "sessions" / "session-0123456789" / "refined.mp4") == 3 * CHUNK_FRAMES


class _Recorder:
    def __init__(self, pacer, kinds):
        self.pacer, self.kinds = pacer, kinds

    def __call__(self, kind="forward"):
        self.kinds.append(kind)
        self.pacer(kind)

    def finish(self):
        self.pacer.finish()


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
