"""Which sessions the engine steps next, and when: just-in-time, batched, fair under overload.

Plain Python over ids, times and counters (no tensors, no I/O): the engine loop asks :meth:`Scheduler.plan`
what to do at ``now``, runs the step, and reports back with :meth:`Scheduler.finish`. Every time is a
float in seconds on the caller's clock, so tests drive it with a fake one.

Invariant. Each streaming session ``s`` has a playback deadline ``ready_until[s]``: the wall time at
which its video buffer runs dry (the end of the last frame it has been given). A chunk delivered at
``t`` extends it to ``max(ready_until, t) + chunk_seconds``; when ``t > ready_until`` the viewer saw
a stall and the chunk counts as *late*. A session that just joined (or resumed) is due at once (its
first chunk is not counted as late).

Policy, at each decision point while the engine is idle:

1. Order the waiting sessions by deadline (earliest first; ties by join order). The first is ``s0``.
2. Batch: ``s0``, then every further session that could not wait for the *next* step, i.e. whose
   deadline falls before ``finish + est(1) + margin``, where ``finish`` is when this step would end;
   at most ``max_batch``. Sessions that can wait are left out so that their own chunk starts later,
   with newer input. (Sessions crowding together thus get batched; staggered ones run alone.)
3. Start time: as late as possible, ``deadline(s0) - est(len(batch)) - margin``, so the chunk uses
   the newest input and still arrives before ``s0``'s buffer runs dry. If that is in the future the
   loop waits (and re-plans when a session joins). If it is already past, the step starts now.
4. ``est(b)`` is the measured step time for a batch of ``b``: an exponential moving average of the
   mean plus twice the moving average deviation (as TCP estimates round trips), per batch size;
   unmeasured sizes borrow from the nearest measured one, scaled up linearly when larger.

Overload. When one step for everyone takes longer than a chunk plays, no order keeps every session at
real time. Deadlines then lie in the past for all of them, step 2 takes every overdue session (up to
``max_batch``), and earliest-deadline-first means the session served longest ago goes first. So every
session slows by the same factor, none starves (a left-out session keeps its old deadline and so
moves to the front), and :meth:`overloaded` tells clients through ``stats``.

Latency arithmetic (measurements.md). A chunk's camera poses are fixed when its step starts, so an
input waits for the session's next step start (on average half a chunk period, ``chunk_seconds/2``,
when the session runs at real time), then for the step (``est(b)``), then for the chunk's first frame
to be shown, ``margin`` later by construction. Input -> first changed frame is therefore about
``chunk_seconds/2 + est(b) + margin`` on average and ``chunk_seconds + est(b) + margin`` at worst,
plus encoding, network and the browser's jitter buffer. Batching lowers the GPU cost per session but
raises ``est(b)``; step 2 batches only sessions whose deadlines crowd, which keeps ``est(b)`` small.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Estimate:
    mean: float
    dev: float


class StepTimeEstimator:
    """Step duration per batch size: EMA of the mean and of the absolute deviation."""

    def __init__(self, prior_seconds: float, alpha: float = 0.2, beta: float = 0.25) -> None:
        self.prior_seconds = prior_seconds  # used until any step has been measured
        self.alpha = alpha  # weight of a new sample in the mean
        self.beta = beta  # weight of a new sample in the deviation
        self._by_size: dict[int, _Estimate] = {}

    def record(self, batch_size: int, seconds: float) -> None:
        est = self._by_size.get(batch_size)
        if est is None:
            self._by_size[batch_size] = _Estimate(mean=seconds, dev=seconds / 4)
            return
        est.dev += self.beta * (abs(seconds - est.mean) - est.dev)
        est.mean += self.alpha * (seconds - est.mean)

    def __call__(self, batch_size: int) -> float:
        """A cautious step time for ``batch_size``: mean + 2 deviations, borrowed when unmeasured."""
        if not self._by_size:
            return self.prior_seconds
        est = self._by_size.get(batch_size)
        if est is not None:
            return est.mean + 2 * est.dev
        larger = [b for b in self._by_size if b > batch_size]
        if larger:  # a smaller batch costs at most what the nearest larger one costs
            near = self._by_size[min(larger)]
            return near.mean + 2 * near.dev
        size = max(self._by_size)  # larger than anything measured: assume cost grows linearly
        near = self._by_size[size]
        return (near.mean + 2 * near.dev) * batch_size / size


@dataclass(frozen=True)
class Plan:
    start_at: float  # when the step should start; <= now means start now
    batch: tuple[str, ...]  # session ids, most urgent first


@dataclass
class _Entry:
    order: int  # join order, breaks deadline ties
    ready_until: float  # wall time at which the session's buffer runs dry
    late_chunks: int = 0
    last_delivery: float | None = None
    speed: float = 1.0  # EMA of chunk_seconds / time between deliveries (1.0 = real time)


class Scheduler:
    """Just-in-time, earliest-deadline-first batching of streaming sessions (policy: module docstring)."""

    def __init__(self, *, chunk_seconds: float, max_batch: int, margin_seconds: float, estimator: StepTimeEstimator) -> None:
        if chunk_seconds <= 0 or max_batch < 1 or margin_seconds < 0:
            raise ValueError("need chunk_seconds > 0, max_batch >= 1, margin_seconds >= 0")
        self.chunk_seconds = chunk_seconds
        self.max_batch = max_batch
        self.margin = margin_seconds
        self.estimate = estimator
        self._entries: dict[str, _Entry] = {}
        self._joined = 0
        self._in_flight: tuple[str, ...] = ()
        self.last_step_seconds: float | None = None

    # -- membership -------------------------------------------------------------------------------
    def add(self, session_id: str, now: float, buffered_seconds: float = 0.0) -> None:
        """Start scheduling a session whose viewer still has ``buffered_seconds`` of video queued."""
        self._joined += 1
        self._entries[session_id] = _Entry(order=self._joined, ready_until=now + buffered_seconds)

    def remove(self, session_id: str) -> None:
        """Stop scheduling a session (ended or paused); a step in flight for it is simply discarded."""
        self._entries.pop(session_id, None)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- the decision -----------------------------------------------------------------------------
    def _waiting(self) -> list[str]:
        busy = set(self._in_flight)
        ids = [sid for sid in self._entries if sid not in busy]
        return sorted(ids, key=lambda sid: (self._entries[sid].ready_until, self._entries[sid].order))

    def plan(self, now: float) -> Plan | None:
        """What to run next (see the module docstring); None when no session is waiting."""
        waiting = self._waiting()
        if not waiting:
            return None
        deadlines = [self._entries[sid].ready_until for sid in waiting]
        size = 1
        while True:  # grow the batch until it is stable; est() grows with size, so this terminates
            start = max(now, deadlines[0] - self.estimate(size) - self.margin)
            finish = start + self.estimate(size)
            cutoff = finish + self.estimate(1) + self.margin
            needed = sum(1 for d in deadlines if d < cutoff)
            new_size = max(1, min(self.max_batch, needed))
            if new_size <= size:
                break
            size = new_size
        return Plan(start_at=start, batch=tuple(waiting[:size]))

    def start(self, batch: tuple[str, ...]) -> None:
        """The loop started a step for ``batch``; these sessions are not planned again until it ends."""
        assert not self._in_flight, "one step at a time"
        self._in_flight = batch

    def finish(self, batch: tuple[str, ...], started: float, now: float) -> dict[str, bool]:
        """The step for ``batch`` delivered its chunks at ``now``; returns which sessions were late."""
        self._in_flight = ()
        self.last_step_seconds = now - started
        self.estimate.record(len(batch), now - started)
        late: dict[str, bool] = {}
        for sid in batch:
            entry = self._entries.get(sid)
            if entry is None:  # removed while its step ran
                continue
            late[sid] = now > entry.ready_until and entry.last_delivery is not None  # the first is due at once
            entry.late_chunks += late[sid]
            entry.ready_until = max(entry.ready_until, now) + self.chunk_seconds
            if entry.last_delivery is not None:
                gap = max(now - entry.last_delivery, 1e-9)
                entry.speed += 0.3 * (min(self.chunk_seconds / gap, 1.0) - entry.speed)
            entry.last_delivery = now
        return late

    def abort(self) -> None:
        """The step in flight failed; its sessions are waiting again with unchanged deadlines."""
        self._in_flight = ()

    # -- what clients are told --------------------------------------------------------------------
    def buffered_seconds(self, session_id: str, now: float) -> float:
        entry = self._entries.get(session_id)
        return 0.0 if entry is None else max(0.0, entry.ready_until - now)

    def queue_position(self, session_id: str) -> int:
        """0 while the session's chunk is being generated, else 1 + its rank among waiting sessions."""
        if session_id in self._in_flight:
            return 0
        waiting = self._waiting()
        return waiting.index(session_id) + 1 if session_id in waiting else 0

    def late_chunks(self, session_id: str) -> int:
        entry = self._entries.get(session_id)
        return 0 if entry is None else entry.late_chunks

    def speed(self, session_id: str) -> float:
        entry = self._entries.get(session_id)
        return 1.0 if entry is None else entry.speed

    def overloaded(self) -> bool:
        """True when even one step for every session (as batched as allowed) outlasts a chunk's playback."""
        n = len(self._entries)
        if n == 0:
            return False
        steps = -(-n // self.max_batch)  # ceil: steps needed per round
        return steps * self.estimate(min(n, self.max_batch)) + self.margin > self.chunk_seconds
