"""Live sessions first: the engine loop publishes when the device is free, the refine worker waits for that.

The server's engine loop knows, after each plan, when its next live step must start. It writes that to a
small file in the data dir (``device-gate.json``, replaced atomically): ``{"idle_until": wall-clock seconds
or null, "written": wall-clock seconds}``; ``null`` means no live session is waiting, a time in the past
that a step is running or due. A refine worker sharing the device (``refine --yield-to-live``, which is
how ``serve`` starts it) asks its :class:`Pacer` before each unit of device work (every refiner forward,
every block's decode); the pacer waits for the device to finish the previous unit, times it, and calls
:meth:`DeviceGate.wait_turn` with its estimate for the next unit, which runs only when it fits before
``idle_until``; otherwise the gate sleeps until the window has passed and reads again. Live steps therefore
never wait for the refiner by more than a misestimated forward, and the refiner uses the gaps the live
sessions leave (the scheduler's ``max_busy`` keeps such gaps), down to gaps of one forward. A gate file
older than ``stale_seconds`` means no server is running: the worker goes ahead. Plain files, so it works across processes and across machines sharing a data dir.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

GATE_NAME = "device-gate.json"


class GatePublisher:
    """Server side: writes the next live step's start time (only when it changes)."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 refresh_seconds: float = 2.0) -> None:
        self.path = Path(data_dir) / GATE_NAME
        self.clock, self.wall = clock, wall
        self.refresh_seconds = refresh_seconds  # rewrite at least this often, so readers can tell a live server
        self._last: tuple[float | None, float] | None = None

    def publish(self, next_start: float | None) -> None:
        """``next_start``: the loop clock's time of the next live step (now or earlier: a step is due or running), None: idle."""
        wall_now = self.wall()
        idle_until = None if next_start is None else round(wall_now + (next_start - self.clock()), 3)
        if self._last is not None and self._last[0] == idle_until and wall_now - self._last[1] < self.refresh_seconds:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"idle_until": idle_until, "written": wall_now}))
        os.replace(tmp, self.path)
        self._last = (idle_until, wall_now)


class DeviceGate:
    """Worker side: :meth:`wait_turn` returns when a block of the estimated length fits before the next live step."""

    def __init__(self, data_dir: Path, *, stale_seconds: float = 10.0, wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] | None = None, poll_seconds: float = 0.05) -> None:
        self.path = Path(data_dir) / GATE_NAME
        self.stale_seconds = stale_seconds
        self.wall = wall
        self._stop = threading.Event()
        self.sleep = sleep or (lambda seconds: self._stop.wait(seconds))
        self.poll_seconds = poll_seconds
        self.waited_seconds = 0.0  # total time spent waiting for the live sessions (for logs and tests)

    def read(self) -> tuple[float | None, float] | None:
        """``(idle_until, written)`` of the gate file, or None when there is none (or it cannot be read)."""
        try:
            data = json.loads(self.path.read_text())
            return data["idle_until"], float(data["written"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def wait_turn(self, estimate_seconds: float) -> None:
        """Block until a step of ``estimate_seconds`` can run without delaying a live step."""
        while not self._stop.is_set():
            state = self.read()
            now = self.wall()
            if state is None or now - state[1] > self.stale_seconds:  # no server publishing: nothing to yield to
                return
            idle_until = state[0]
            if idle_until is None or idle_until - now >= estimate_seconds:
                return
            pause = max(self.poll_seconds, idle_until - now + self.poll_seconds)  # past the next live step
            self.waited_seconds += pause
            self.sleep(min(pause, 1.0))

    def stop(self) -> None:
        self._stop.set()


class UnitTimer:
    """The worker's estimate of a unit of work's time: a cautious moving average of the units so far."""

    def __init__(self, prior_seconds: float = 0.5, alpha: float = 0.3) -> None:
        self.mean = prior_seconds
        self.alpha = alpha
        self._seen = False

    def record(self, seconds: float) -> None:
        self.mean = seconds if not self._seen else self.mean + self.alpha * (seconds - self.mean)
        self._seen = True

    def estimate(self) -> float:
        return 1.25 * self.mean


class Pacer:
    """Worker side: call ``pacer(kind)`` before each unit of device work. It waits for the device to finish the
    previous unit (``sync``), records that unit's time (from its turn to now, so the host work after it counts
    too) under its kind, then waits for a gap that the new unit's estimate fits in. Without a gate it does nothing:
    nothing to yield to, so no reason to stall the device queue."""

    def __init__(self, gate: DeviceGate | None, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gate = gate
        self.sync = sync
        self.clock = clock
        self.timers: dict[str, UnitTimer] = {}
        self._running: tuple[str, float] | None = None  # the unit that had the last turn, and when

    def __call__(self, kind: str = "forward") -> None:
        if self.gate is None:
            return
        self.sync()
        self.finish()
        self.gate.wait_turn(self.timers.setdefault(kind, UnitTimer()).estimate())
        self._running = (kind, self.clock())

    def finish(self) -> None:
        """Record the running unit as ended now (the pacer's owner calls it when it stops asking)."""
        if self._running is not None:
            kind, began = self._running
            self.timers[kind].record(self.clock() - began)
            self._running = None
