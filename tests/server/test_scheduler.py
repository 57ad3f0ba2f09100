"""The scheduling policy on a fake clock: just-in-time starts, batching, fairness, joining mid-run."""

from __future__ import annotations

import pytest

from stream_server.scheduler import Scheduler, StepTimeEstimator

CHUNK = 1.5  # seconds of video per chunk (24 frames at 16 fps)
MARGIN = 0.1


class FixedCost:
    """A step-time model for the simulation: ``base + per_session * batch``."""

    def __init__(self, base: float, per_session: float) -> None:
        self.base, self.per_session = base, per_session

    def __call__(self, batch: int) -> float:
        return self.base + self.per_session * batch


def make(max_batch: int = 8) -> Scheduler:
    return Scheduler(chunk_seconds=CHUNK, max_batch=max_batch, margin_seconds=MARGIN, estimator=StepTimeEstimator(0.3))


def simulate(sched: Scheduler, cost: FixedCost, until: float, joins: dict[str, float] | None = None):
    """Run the loop of stream_server.loop on a fake clock; returns (steps, deliveries per session).

    ``steps``: (start, finish, batch); joins: session id -> time it joins.
    """
    joins = dict(joins or {})
    now = 0.0
    steps: list[tuple[float, float, tuple[str, ...]]] = []
    delivered: dict[str, list[float]] = {sid: [] for sid in joins}
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
        sched.start(plan.batch)
        finish = now + cost(len(plan.batch))
        sched.finish(plan.batch, now, finish)
        steps.append((now, finish, plan.batch))
        for sid in plan.batch:
            delivered[sid].append(finish)
        now = finish
    return steps, delivered


def test_estimator_borrows_and_extrapolates():
    est = StepTimeEstimator(prior_seconds=0.7)
    assert est(3) == 0.7  # nothing measured: the prior
    for _ in range(50):
        est.record(2, 0.4)
    assert est(2) == pytest.approx(0.4, abs=1e-3)  # steady samples: the deviation decays
    assert est(1) == pytest.approx(est(2))  # smaller: at most the nearest larger size
    assert est(4) == pytest.approx(2 * est(2))  # larger: linear in the batch size
    est.record(2, 1.0)  # an outlier raises the estimate by more than its share of the mean
    assert est(2) > 0.4 + 0.2 * 0.6


def test_new_session_starts_at_once_then_just_in_time():
    sched = make()
    sched.add("a", now=10.0)
    plan = sched.plan(10.0)
    assert plan.batch == ("a",) and plan.start_at == 10.0  # nothing buffered: due now
    sched.start(plan.batch)
    sched.finish(plan.batch, started=10.0, now=10.3)
    assert sched.buffered_seconds("a", 10.3) == pytest.approx(CHUNK)
    plan = sched.plan(10.3)
    # The next chunk starts as late as possible: buffer end - estimated step time - margin.
    assert plan.start_at == pytest.approx(10.3 + CHUNK - sched.estimate(1) - MARGIN)
    assert plan.start_at > 10.3 + 0.5 * CHUNK


def test_steady_single_session_never_stalls_and_waits_half_a_chunk():
    sched = make()
    steps, delivered = simulate(sched, FixedCost(0.2, 0.1), until=60.0, joins={"a": 0.0})
    assert sched.late_chunks("a") == 0
    gaps = [b - a for a, b in zip(delivered["a"], delivered["a"][1:])]
    assert all(g == pytest.approx(CHUNK, abs=0.05) for g in gaps[3:])  # real time, one chunk per period
    # Just in time: each chunk arrives shortly before the buffer runs dry, not a chunk early.
    start, finish, _ = steps[-1]
    assert sched.buffered_seconds("a", finish) < CHUNK + MARGIN + 0.05


def test_staggered_sessions_run_alone_crowded_ones_batch():
    sched = make()
    # Staggered by half a chunk: each has time for its own step, so batches stay at 1.
    steps, _ = simulate(sched, FixedCost(0.2, 0.1), until=30.0, joins={"a": 0.0, "b": 0.75})
    assert {len(batch) for _, _, batch in steps[4:]} == {1}
    # Joining together: both are due at once and share every step.
    sched = make()
    steps, _ = simulate(sched, FixedCost(0.2, 0.1), until=30.0, joins={"a": 0.0, "b": 0.0})
    assert all(set(batch) == {"a", "b"} for _, _, batch in steps)


def test_session_joining_mid_run_is_served_next_without_starving_others():
    sched = make()
    steps, delivered = simulate(sched, FixedCost(0.2, 0.1), until=30.0, joins={"a": 0.0, "b": 0.0, "c": 10.0})
    first_c = next(start for start, _, batch in steps if "c" in batch)
    assert 10.0 <= first_c < 10.0 + 0.4  # at most one step in flight ahead of it
    assert delivered["c"][0] < 10.7
    assert sched.late_chunks("a") == sched.late_chunks("b") == 0


def test_overload_slows_everyone_equally_and_starves_no_one():
    # Four sessions, but the GPU takes 0.6 s per session-chunk with batches of at most 2:
    # a round costs 2.4 s for 1.5 s of video, so everyone runs at ~0.6x real time.
    sched = make(max_batch=2)
    cost = FixedCost(0.0, 0.6)
    steps, delivered = simulate(sched, cost, until=120.0, joins={s: 0.0 for s in "abcd"})
    assert sched.overloaded()
    counts = {sid: len(times) for sid, times in delivered.items()}
    assert max(counts.values()) - min(counts.values()) <= 1  # equal shares
    for sid, times in delivered.items():
        longest_gap = max(b - a for a, b in zip(times, times[1:]))
        assert longest_gap <= 2 * cost(2) + 1e-9  # never skipped for more than a round
        assert sched.speed(sid) == pytest.approx(CHUNK / (2 * cost(2)), rel=0.1)
    assert all(len(batch) == 2 for _, _, batch in steps)  # overdue sessions fill the batch


def test_underload_is_not_overloaded_and_queue_positions_follow_deadlines():
    sched = make()
    sched.add("a", 0.0)
    sched.add("b", 0.0, buffered_seconds=1.0)
    assert not sched.overloaded()
    assert sched.queue_position("a") == 1 and sched.queue_position("b") == 2
    plan = sched.plan(0.0)
    sched.start(plan.batch)
    assert sched.queue_position("a") == 0  # generating now
    sched.remove("a")
    sched.finish(plan.batch, 0.0, 0.3)  # a step for a removed session is discarded quietly
    assert "a" not in sched and len(sched) == 1


def test_staggered_load_keeps_batches_small_and_everyone_on_time():
    """Eight sessions spread over a chunk on a device whose cost grows with the batch (a CPU): one step
    for all eight would take 0.82 s and delay every chunk's input by that much; the policy serves them in
    small batches instead, and no chunk is late."""
    sched = make()
    joins = {f"s{i}": i * CHUNK / 8 for i in range(8)}
    steps, delivered = simulate(sched, FixedCost(0.02, 0.1), until=60.0, joins=joins)
    later = [len(batch) for start, _, batch in steps if start > 10.0]
    assert sum(later) / len(later) <= 2.0 and max(later) < 8
    assert all(sched.late_chunks(sid) == 0 for sid in joins)
    for times in delivered.values():  # real time: one chunk per 1.5 s after the start
        assert len(times) >= 60.0 / CHUNK - 3
