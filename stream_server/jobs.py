"""The durable refinement queue: one job per ended session, in SQLite (WAL) at ``<data-dir>/jobs.sqlite3``.

States: ``queued`` -> ``refining`` -> ``done`` | ``failed``; a failed attempt that may succeed later goes
back to ``queued`` with an exponential backoff. A worker holds a job through a lease (its id and an
expiry it renews by heartbeats); a worker that dies (even by SIGKILL) stops renewing, and once the lease
has expired any worker may claim the job again, which counts as another attempt.

Invariant: a job is ``done`` only after its ``refined.mp4`` is complete on disk. :meth:`JobQueue.finish`
renames the finished file into place and marks the job done inside one write transaction, and only while
the caller still holds the lease, so of two workers that both refined a job only one finishes it.

Every method opens its own short connection, so the queue is safe to use from any thread or process.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

DB_NAME = "jobs.sqlite3"
STATES = ("queued", "refining", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    session_id   TEXT PRIMARY KEY,
    state        TEXT NOT NULL,               -- one of STATES
    progress     REAL NOT NULL DEFAULT 0,     -- 0..1, of the current attempt
    attempts     INTEGER NOT NULL DEFAULT 0,  -- attempts started (claims)
    not_before   REAL NOT NULL DEFAULT 0,     -- a queued job waits until then (backoff)
    lease_owner  TEXT,                        -- worker holding a refining job
    lease_until  REAL,                        -- when that lease expires unless renewed
    error        TEXT,                        -- why the last attempt failed
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Job:
    session_id: str
    state: str
    progress: float
    attempts: int
    not_before: float
    lease_owner: str | None
    lease_until: float | None
    error: str | None
    created_at: float
    updated_at: float


class LeaseLost(Exception):
    """The worker no longer holds the job (its lease expired and another worker took it, or it was deleted)."""


class JobQueue:
    """The queue in ``data_dir``; ``clock`` is wall time (leases are compared across processes)."""

    def __init__(self, data_dir: Path, *, max_attempts: int = 3, backoff_seconds: float = 10.0,
                 max_backoff_seconds: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(data_dir) / DB_NAME
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database's write lock at once (no lost updates)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- producers and readers ------------------------------------------------------------------------
    def enqueue(self, session_id: str, error: str | None = None) -> None:
        """Queue ``session_id`` (once: a second enqueue is ignored); with ``error`` it is failed at once."""
        now = self.clock()
        state = "queued" if error is None else "failed"
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO jobs (session_id, state, error, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                       (session_id, state, error, now, now))

    def get(self, session_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE session_id = ?", (session_id,)).fetchone()
        return None if row is None else Job(**row)

    def jobs(self) -> list[Job]:
        with self._connect() as db:
            return [Job(**row) for row in db.execute("SELECT * FROM jobs ORDER BY created_at")]

    def delete(self, session_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM jobs WHERE session_id = ?", (session_id,))

    def pending(self, session_id: str | None = None) -> float | None:
        """When the next unfinished job (of ``session_id``, or any) may be claimed; None when none is left."""
        query = ("SELECT MIN(CASE state WHEN 'queued' THEN not_before ELSE lease_until END) FROM jobs "
                 "WHERE state IN ('queued', 'refining')")
        args: tuple = ()
        if session_id is not None:
            query, args = query + " AND session_id = ?", (session_id,)
        with self._connect() as db:
            return db.execute(query, args).fetchone()[0]

    # -- workers --------------------------------------------------------------------------------------
    def claim(self, worker: str, lease_seconds: float, session_id: str | None = None) -> Job | None:
        """Take the oldest claimable job (queued and past its backoff, or refining with an expired lease).

        A job whose lease expired with no attempts left is failed instead of claimed.
        """
        now = self.clock()
        with self._write() as db:
            while True:
                query = ("SELECT * FROM jobs WHERE ((state = 'queued' AND not_before <= ?) OR "
                         "(state = 'refining' AND lease_until < ?))")
                args: tuple = (now, now)
                if session_id is not None:
                    query, args = query + " AND session_id = ?", args + (session_id,)
                row = db.execute(query + " ORDER BY created_at LIMIT 1", args).fetchone()
                if row is None:
                    return None
                if row["state"] == "refining" and row["attempts"] >= self.max_attempts:
                    db.execute("UPDATE jobs SET state = 'failed', error = ?, lease_owner = NULL, lease_until = NULL, "
                               "updated_at = ? WHERE session_id = ?",
                               (f"the worker stopped (lease expired) on all {row['attempts']} attempts", now, row["session_id"]))
                    continue
                db.execute("UPDATE jobs SET state = 'refining', progress = 0, attempts = attempts + 1, lease_owner = ?, "
                           "lease_until = ?, updated_at = ? WHERE session_id = ?",
                           (worker, now + lease_seconds, now, row["session_id"]))
                return Job(**db.execute("SELECT * FROM jobs WHERE session_id = ?", (row["session_id"],)).fetchone())

    def heartbeat(self, job: Job, lease_seconds: float, progress: float | None = None) -> None:
        """Renew the lease (and record ``progress``); raises :class:`LeaseLost` when it is no longer held."""
        now = self.clock()
        with self._write() as db:
            updated = db.execute(
                "UPDATE jobs SET lease_until = ?, progress = COALESCE(?, progress), updated_at = ? "
                "WHERE session_id = ? AND state = 'refining' AND lease_owner = ?",
                (now + lease_seconds, progress, now, job.session_id, job.lease_owner),
            ).rowcount
        if not updated:
            raise LeaseLost(job.session_id)

    def finish(self, job: Job, commit: Callable[[], None]) -> None:
        """Run ``commit`` (which puts the finished file in place) and mark the job done, atomically with
        respect to other workers; raises :class:`LeaseLost` (without calling ``commit``) if not held."""
        with self._write() as db:
            row = db.execute("SELECT state, lease_owner FROM jobs WHERE session_id = ?", (job.session_id,)).fetchone()
            if row is None or row["state"] != "refining" or row["lease_owner"] != job.lease_owner:
                raise LeaseLost(job.session_id)
            commit()
            db.execute("UPDATE jobs SET state = 'done', progress = 1, error = NULL, lease_owner = NULL, lease_until = NULL, "
                       "updated_at = ? WHERE session_id = ?", (self.clock(), job.session_id))

    def fail(self, job: Job, reason: str, *, retry: bool) -> str:
        """End the attempt: back to ``queued`` after a backoff when ``retry`` and attempts are left, else
        ``failed``. Returns the new state (unchanged when the lease was lost)."""
        now = self.clock()
        with self._write() as db:
            row = db.execute("SELECT state, lease_owner, attempts FROM jobs WHERE session_id = ?", (job.session_id,)).fetchone()
            if row is None or row["state"] != "refining" or row["lease_owner"] != job.lease_owner:
                return row["state"] if row is not None else "deleted"
            if retry and row["attempts"] < self.max_attempts:
                delay = min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (row["attempts"] - 1))
                state, not_before = "queued", now + delay
            else:
                state, not_before = "failed", 0.0
            db.execute("UPDATE jobs SET state = ?, not_before = ?, error = ?, lease_owner = NULL, lease_until = NULL, "
                       "updated_at = ? WHERE session_id = ?", (state, not_before, reason, now, job.session_id))
        return state
