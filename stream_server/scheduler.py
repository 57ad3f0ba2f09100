"""Which sessions the engine steps next, and when: just-in-time, batched within a latency budget, fair.

Plain Python over ids, times and counters (no tensors, no I/O): the engine loop asks :meth:`Scheduler.plan`
what to do at ``now``, runs the step, and reports back with :meth:`Scheduler.finish`. Every time is a
float in seconds on the caller's clock, so tests drive it with a fake one.

Invariant. Each streaming session ``s`` has a playback deadline ``ready_until[s]``: the wall time at
which its video buffer runs dry (the end of the last frame it has been given). A chunk delivered at
``t`` extends it to ``max(ready_until, t) + C`` (``C`` = ``chunk_seconds``); when ``t > ready_until``
the viewer saw a stall and the chunk counts as *late*. A session that just joined (or resumed) is due
at once (its first chunk is not counted as late). Only a stall moves a deadline later, and nothing
moves it earlier: sessions keep the phase their first chunk gave them.

Latency arithmetic (measurements.md). A chunk's camera poses are fixed when its step starts, and its
first frame is shown when the previous chunk has played out, at the deadline ``d``. An input therefore
waits for the session's next step start (half the time between starts on average, ``C/2`` at real
time), then the step's *lead* ``d - start``. For a step of ``b`` sessions that starts just in time the
lead is ``est(b) + margin``, so input -> frame is about ``C/2 + est(b) + margin`` on average and
``C + est(b) + margin`` at worst (plus encoding, network and the browser's jitter buffer); a session
whose deadline is later than its batch leader's waits that much longer. ``est(b)`` covers only what the
frames wait for: the engine's trailing work of a step (the state write, one DiT forward of five) runs
after the frames are out, as its own *settle* phase of cost ``settle(b)``, and delays only the next step.
Batching lowers the device time per session (a round of ``n`` sessions in batches of ``b`` costs
``ceil(n/b) * (est(b) + settle(b))``) but raises ``est(b)``. Real time needs the round to fit in a chunk's
playback; latency wants ``est(b)`` small. Hence the policy.

Policy, at each decision point while the engine is idle (``n`` sessions, ``est`` as below):

1. Batch cap, the latency budget: among the sizes ``b <= max_batch`` whose round fits with room to
   spare, ``ceil(n/b) * (est(b) + settle(b)) + margin <= max_busy * C``, take the one with the shortest step
   ``est(b)`` (ties: the smaller). ``max_busy`` (< 1 in a server) leaves the rest of each chunk's time
   to the work beside the engine (video encoding, WebRTC, a refiner on the same device); when no size
   leaves that room but some still fit in ``C``, the cap is the one whose round leaves the most. With
   a step cost ``a + k*b`` (``a`` fixed, ``k`` per session) that is the smallest batch that keeps
   everyone at real time: small batches where the per-session cost dominates (CPU), one
   batch of everyone where the fixed cost dominates (GPU). So that jitter in the estimate does not make
   the cap flap, the current cap stays while its round fits, unless another one fits with
   ``2 * margin``.
2. Groups: the waiting sessions in deadline order (ties by join order); a session due before
   ``now + est(1) + margin`` is late whatever we do, and counts as due then. Each group is a leader and
   the sessions due before ``leader + est(cap)``, at most ``cap``: those could not wait for the next
   step, which may be a full one. Sessions that can wait are left out so that their own chunk starts
   later, with newer input.
3. Start: the latest time at which the whole chain of groups, run back to back, delivers each group
   ``margin`` before its leader's deadline using each group's own ``est`` and ``settle``. Backwards: a
   group must deliver by ``min(leader deadline - margin, start of the next group - settle(size))`` and
   starts ``est(size)`` before that. A round costs ``est(b) + settle(b)`` per batch (step 1).
   The plan is the first group at that time (or now, if it is past); the loop waits until then (and
   re-plans when a session joins or leaves). A first group of a size whose ``est`` lies on the line
   through other sizes' steady steps, none of its own counting (step 4), starts now: an extrapolated time
   is no ground for waiting to the last moment (seen: the first step that paired two demo sessions on 2
   CPU cores took 1.14-1.24 s against an ``est`` of 0.91-0.95 s, and was late). That chunk's input is
   then up to the wait older when it plays; a stall would have moved every later deadline instead.
4. ``est(b)`` (and likewise ``settle(b)``, from its own samples) is the cautious step time for a batch of
   ``b``: the moving average for that size times
   ``1 + max(2 * dev, peak)``, ``dev`` being the moving average of the relative deviation of steps from
   their size's mean (as TCP estimates round trips, shared by all sizes since jitter belongs to the
   machine) and ``peak`` the largest recent relative overrun of a steady step, fading by 2% a step and
   at most 50%: where most steps are steady and a few run long (2 CPU cores shared with video encoding:
   steps 10-25% over their mean at ``dev`` 0.03-0.08), the mean deviation alone undercounts them.
   Unmeasured sizes (and sizes not measured for a while: :class:`StepTimeEstimator`) lie on the line
   through the nearest measured ones, continued past the ends (never
   decreasing, nor below proportional scaling); with a single measured size, half of its cost is
   assumed fixed. Before any measurement every size costs the prior.

Overload. When no cap fits (even the best batching needs more device time per round than a chunk
plays), the cap is the size with the shortest round (ties: the larger), deadlines lie in the past, all
overdue sessions count as equally due, and earliest-deadline-first serves the one served longest ago
first. So every session slows by the same factor, none starves (a left-out session keeps its old
deadline and so moves to the front), and :meth:`overloaded` tells clients through ``stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

WARM_UP_CHUNKS = 2  # a step that holds one of a session's first this many chunks is no steady sample


class StepTimeEstimator:
    """Step duration per batch size: a moving-average mean per measured size, one relative deviation.

    A size that is not chosen is not measured again, so a mean that one slow step spoiled could keep its size
    out for good. Two rules keep the table honest. Steps that held one of a session's first ``WARM_UP_CHUNKS``
    chunks are *warm-up* samples: the first chunk has one latent more and the start image's encoding, and around
    both the session's video encoder (and, on a laptop, its viewer's decoder) start up on the same cores (seen:
    the second chunk's step of two demo sessions on 2 CPU cores took 1.83 s, the steady ones 0.6-0.7 s). They
    are kept apart: they are used only until any steady step
    has been measured. And a size's mean goes *stale* once ``stale_after`` steady steps of other sizes have
    been measured since its own last one: it then counts only where it is below the line through the fresh
    sizes (as if unmeasured), so the scheduler tries it again when that line says it pays, and the new sample
    starts its mean afresh.
    """

    def __init__(self, prior_seconds: float, alpha: float = 0.2, beta: float = 0.25, stale_after: int = 20,
                 peak_decay: float = 0.98, peak_cap: float = 0.5) -> None:
        self.prior_seconds = prior_seconds  # used until any step has been measured
        self.alpha = alpha  # weight of a new sample in its size's mean
        self.beta = beta  # weight of a new sample in the relative deviation
        self.stale_after = stale_after  # steady steps of other sizes after which a size's mean no longer counts
        self._mean: dict[int, float] = {}  # batch size -> moving average of its steady step seconds
        self._warmup: dict[int, float] = {}  # the same for steps that held a session's first chunks
        self._steady_count = 0  # steady samples recorded
        self._last_seen: dict[int, int] = {}  # batch size -> the steady count at its last sample
        self.deviation = 0.0  # moving average of |sample - mean| / mean, over all sizes
        self.peak_decay, self.peak_cap = peak_decay, peak_cap
        self.peak = 0.0  # the largest recent overrun (sample - mean) / mean of a steady step, fading by peak_decay

    def record(self, batch_size: int, seconds: float, steady: bool = True) -> None:
        table = self._mean if steady else self._warmup
        if steady:
            if batch_size in table and self._stale(batch_size):
                del table[batch_size]  # a stale mean starts over from the new sample
            self._steady_count += 1
            self._last_seen[batch_size] = self._steady_count
        mean = table.get(batch_size)
        if mean is None:
            table[batch_size] = seconds
            return
        self.deviation += self.beta * (abs(seconds - mean) / mean - self.deviation)
        if steady:
            self.peak = min(self.peak_cap, max((seconds - mean) / mean, self.peak * self.peak_decay))
        table[batch_size] = mean + self.alpha * (seconds - mean)

    def extrapolated(self, batch_size: int) -> bool:
        """Whether :meth:`mean` of ``batch_size`` comes from other sizes' steady steps, none of its own counting."""
        fresh = self._fresh()
        return bool(fresh) and batch_size not in fresh

    def _fresh(self) -> dict[int, float]:
        """The steady means that count: those of sizes not stale."""
        return {b: m for b, m in self._mean.items() if not self._stale(b)}

    def _stale(self, batch_size: int) -> bool:
        return self._steady_count - self._last_seen[batch_size] >= self.stale_after

    def mean(self, batch_size: int) -> float:
        """The expected step time: measured, or on the line through the nearest measured sizes; a stale size's
        mean counts only where it is below that line (so that staleness makes a size worth a retry, never worse)."""
        table = self._fresh() or self._warmup
        if not table:
            return self.prior_seconds
        if batch_size in table:
            return table[batch_size]
        line = _on_the_line(sorted(table.items()), batch_size)
        return min(line, self._mean[batch_size]) if batch_size in self._mean else line

    def __call__(self, batch_size: int) -> float:
        """A cautious step time for ``batch_size``: the mean plus two deviations, or plus the largest recent
        overrun where that is more (step times with rare long steps: a mean deviation undercounts the tail)."""
        return self.mean(batch_size) * (1 + max(2 * self.deviation, self.peak))


def _on_the_line(points: list[tuple[int, float]], batch_size: int) -> float:
    """The step time of ``batch_size`` on the line through the nearest of the measured ``(size, mean)`` points."""
    if len(points) == 1:  # one measured size: assume half of its cost is fixed
        points = [(0, points[0][1] / 2), *points]
    segments = list(zip(points, points[1:]))
    (b1, m1), (b2, m2) = next((seg for seg in segments if batch_size < seg[1][0]), segments[-1])
    slope = (m2 - m1) / (b2 - b1)
    if batch_size > b2:  # past the largest: never cheaper than it
        return m2 + max(slope, 0.0) * (batch_size - b2)
    if batch_size < b1:  # below the smallest: no cheaper per session than it
        return max(m1 - max(slope, 0.0) * (b1 - batch_size), m1 * batch_size / b1)
    return m1 + slope * (batch_size - b1)


@dataclass(frozen=True)
class Plan:
    start_at: float  # when the step should start; <= now means start now
    batch: tuple[str, ...]  # session ids, most urgent first


@dataclass
class _Entry:
    order: int  # join order, breaks deadline ties
    ready_until: float  # wall time at which the session's buffer runs dry
    late_chunks: int = 0
    delivered: int = 0  # chunks delivered so far
    speed: float = 1.0  # EMA of chunk_seconds / (chunk_seconds + stall before it) (1.0 = real time)


class Scheduler:
    """Just-in-time, earliest-deadline-first batching of streaming sessions (policy: module docstring)."""

    def __init__(self, *, chunk_seconds: float, max_batch: int, margin_seconds: float, estimator: StepTimeEstimator,
                 max_busy: float = 1.0) -> None:
        if chunk_seconds <= 0 or max_batch < 1 or margin_seconds < 0 or not 0 < max_busy <= 1:
            raise ValueError("need chunk_seconds > 0, max_batch >= 1, margin_seconds >= 0, 0 < max_busy <= 1")
        self.max_busy = max_busy
        self.chunk_seconds = chunk_seconds
        self.max_batch = max_batch
        self.margin = margin_seconds
        self.estimate = estimator
        self.settle_estimate = StepTimeEstimator(prior_seconds=0.0)  # the engine's work after the frames
        self._entries: dict[str, _Entry] = {}
        self._joined = 0
        self._in_flight: tuple[str, ...] = ()
        self._cap: int | None = None  # the batch cap last chosen (kept while it still fits)
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

    def _round_seconds(self, batch: int) -> float:
        """Device time for one chunk of every session in batches of at most ``batch``."""
        return -(-len(self._entries) // batch) * self._busy(batch)

    def _busy(self, batch: int) -> float:
        """The engine's time for a step of ``batch`` with its settle phase."""
        return self.estimate(batch) + self.settle_estimate(batch)

    def _fits(self, batch: int, slack: float) -> bool:
        return self._round_seconds(batch) + slack <= self.chunk_seconds

    def batch_cap(self) -> int:
        """The latency budget (module docstring, step 1); remembers its choice for the hysteresis."""
        sizes = range(1, max(1, min(len(self._entries), self.max_batch)) + 1)
        fits = [b for b in sizes if self._fits(b, self.margin)]
        room = (1 - self.max_busy) * self.chunk_seconds  # left free for the work beside the engine
        roomy = [b for b in fits if self._fits(b, self.margin + room)]
        if not roomy:  # overloaded, or real time with little room: the shortest round (ties: larger)
            self._cap = min(fits or sizes, key=lambda b: (round(self._round_seconds(b), 9), -b))
            return self._cap
        fits = roomy
        if self._cap in fits:  # a change by choice must fit with twice the margin
            fits = [b for b in fits if b == self._cap or self._fits(b, 2 * self.margin + room)]
        self._cap = min(fits, key=lambda b: (self.estimate(b), b))
        return self._cap

    def plan(self, now: float) -> Plan | None:
        """What to run next (see the module docstring); None when no session is waiting."""
        waiting = self._waiting()
        if not waiting:
            return None
        cap = self.batch_cap()
        deadlines = [self._entries[sid].ready_until for sid in waiting]
        overdue = now + self.estimate(1) + self.margin  # due before this: late whatever we do
        due = [max(d, overdue) for d in deadlines]
        groups: list[tuple[int, int]] = []  # (index of the leader in waiting, size)
        first = 0
        while first < len(waiting):
            end = first + 1
            while end < len(waiting) and end - first < cap and due[end] < due[first] + self.estimate(cap):
                end += 1
            groups.append((first, end - first))
            first = end
        start = float("inf")  # the chain backwards: each group delivers by its leader's deadline - margin
        for leader, size in reversed(groups):
            start = min(deadlines[leader] - self.margin, start - self.settle_estimate(size)) - self.estimate(size)
        if self.estimate.extrapolated(groups[0][1]):  # no waiting to the last moment on an extrapolated time
            start = now
        return Plan(start_at=max(now, start), batch=tuple(waiting[:groups[0][1]]))

    def start(self, batch: tuple[str, ...]) -> None:
        """The loop started a step for ``batch``; these sessions are not planned again until it ends."""
        assert not self._in_flight, "one step at a time"
        self._in_flight = batch

    def finish(self, batch: tuple[str, ...], started: float, now: float) -> dict[str, bool]:
        """The step for ``batch`` delivered its chunks at ``now``; returns which sessions were late."""
        self._in_flight = ()
        self.last_step_seconds = now - started
        steady = all(sid in self._entries and self._entries[sid].delivered >= WARM_UP_CHUNKS for sid in batch)
        self.estimate.record(len(batch), now - started, steady=steady)
        late: dict[str, bool] = {}
        for sid in batch:
            entry = self._entries.get(sid)
            if entry is None:  # removed while its step ran
                continue
            late[sid] = now > entry.ready_until and entry.delivered > 0  # the first is due at once
            entry.late_chunks += late[sid]
            if entry.delivered > 0:  # a chunk played over its own length plus the stall before it
                stall = max(now - entry.ready_until, 0.0)
                entry.speed += 0.3 * (self.chunk_seconds / (self.chunk_seconds + stall) - entry.speed)
            entry.ready_until = max(entry.ready_until, now) + self.chunk_seconds
            entry.delivered += 1
        return late

    def settled(self, batch_size: int, seconds: float) -> None:
        """The engine finished the settle phase of a step of ``batch_size`` sessions in ``seconds``."""
        self.settle_estimate.record(batch_size, seconds)

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
        """True when no batch cap keeps a round of every session within a chunk's playback (and margin)."""
        n = len(self._entries)
        return n > 0 and not any(self._fits(b, self.margin) for b in range(1, min(n, self.max_batch) + 1))
