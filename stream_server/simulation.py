"""The scheduler on a simulated clock: what the viewers of a server would see for given step costs.

Runs the loop of :mod:`stream_server.loop` (plan, wait, step, deliver, settle) with step and settle times from
cost functions instead of an engine, and records every step and every chunk's time on screen. The tests use it
to check the scheduler's policy; ``sana-wm-stream bench`` uses it to turn measured step times into the
input -> frame latency the scheduler would achieve at a given load.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, field
from typing import Callable

from .scheduler import Scheduler

Cost = Callable[[int], float]  # batch size -> seconds


@dataclass(frozen=True)
class Step:
    start: float
    finish: float  # when its frames were delivered
    batch: tuple[str, ...]
    due: float  # the earliest deadline in the batch when it started


@dataclass
class Run:
    """What the simulated viewers saw."""

    steps: list[Step] = field(default_factory=list)
    delivered: dict[str, list[float]] = field(default_factory=dict)  # session -> delivery times
    shown: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # session -> (step start, chunk shown)
    late: list[tuple[float, str]] = field(default_factory=list)  # (delivery time, session) of each stall

    def late_after(self, t: float) -> int:
        return sum(1 for at, _ in self.late if at > t)

    def sizes_after(self, t: float) -> list[int]:
        return [len(s.batch) for s in self.steps if s.start > t]

    def leads_after(self, t: float) -> list[float]:
        """Per chunk: its step start (the newest input it can use) -> its first frame on screen."""
        return [shown - start for chunks in self.shown.values() for start, shown in chunks if start > t]

    def input_latency(self, since: float, until: float) -> tuple[float, float]:
        """p50 and p95 of input -> first frame that uses it, for inputs every 10 ms in [since, until):
        an input is used by the first chunk of its session whose step starts at or after it."""
        latencies = []
        for chunks in self.shown.values():
            starts = [start for start, _ in chunks]
            for i in range(int((until - since) * 100)):
                t = since + i / 100
                k = bisect.bisect_left(starts, t)
                if k < len(chunks):
                    latencies.append(chunks[k][1] - t)
        p = statistics.quantiles(latencies, n=20)
        return statistics.median(latencies), p[18]


def simulate(sched: Scheduler, cost: Cost, until: float, joins: dict[str, float] | None = None,
             settle: Cost | None = None) -> Run:
    """Run ``sched`` until ``until`` seconds; ``joins``: session id -> time it joins; ``cost`` and ``settle``:
    seconds of a step up to its frames and of the engine's work after them (none if ``settle`` is None)."""
    joins = dict(joins or {})
    now = 0.0
    run = Run(delivered={sid: [] for sid in joins}, shown={sid: [] for sid in joins})
    buffer_end: dict[str, float] = {}
    while now < until:
        for sid, at in list(joins.items()):
            if at <= now:
                sched.add(sid, now)
                del joins[sid]
        plan = sched.plan(now)
        next_join = min(joins.values(), default=float("inf"))
        if plan is None or plan.start_at > now:
            now = min(next_join, plan.start_at if plan else float("inf"), until)
            continue
        due = min(now + sched.buffered_seconds(sid, now) for sid in plan.batch)
        sched.start(plan.batch)
        finish = now + cost(len(plan.batch))
        late = sched.finish(plan.batch, now, finish)
        run.steps.append(Step(now, finish, plan.batch, due))
        for sid in plan.batch:
            run.delivered[sid].append(finish)
            shown = max(buffer_end.get(sid, finish), finish)  # after the chunk before it has played
            buffer_end[sid] = shown + sched.chunk_seconds
            run.shown[sid].append((now, shown))
            if late[sid]:
                run.late.append((finish, sid))
        now = finish
        if settle is not None:
            seconds = settle(len(plan.batch))
            sched.settled(len(plan.batch), seconds)
            now += seconds
    return run


def staggered(n: int, chunk_seconds: float) -> dict[str, float]:
    """``n`` sessions joining evenly over one chunk's time, as viewers arriving one by one would."""
    return {f"s{i}": i * chunk_seconds / n for i in range(n)}
