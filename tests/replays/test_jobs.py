"""The job queue: states, leases, retries with backoff, exactly-once completion (fake clock, no model)."""

from __future__ import annotations

import pytest

from stream_server.jobs import JobQueue, LeaseLost


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path, clock) -> JobQueue:
    return JobQueue(tmp_path, max_attempts=3, backoff_seconds=10.0, clock=clock)


def test_database_is_wal_and_enqueue_is_idempotent(queue, tmp_path):
    import sqlite3

    queue.enqueue("session-a")
    queue.enqueue("session-a")
    assert [j.session_id for j in queue.jobs()] == ["session-a"]
    assert queue.get("session-a").state == "queued"
    assert sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_queued_refining_done(queue):
    queue.enqueue("session-a")
    job = queue.claim("w1", lease_seconds=30)
    assert job.state == "refining" and job.attempts == 1 and job.lease_owner == "w1"
    assert queue.claim("w2", lease_seconds=30) is None  # leased
    queue.heartbeat(job, 30, progress=0.5)
    assert queue.get("session-a").progress == 0.5
    committed = []
    queue.finish(job, lambda: committed.append(True))
    done = queue.get("session-a")
    assert committed == [True] and done.state == "done" and done.progress == 1.0 and done.lease_owner is None
    assert queue.pending() is None


def test_expired_lease_is_retaken_and_the_old_worker_cannot_finish(queue, clock):
    queue.enqueue("session-a")
    old = queue.claim("w1", lease_seconds=30)
    clock.now += 31  # w1 stopped renewing (killed)
    assert queue.pending() == pytest.approx(clock.now - 1)
    new = queue.claim("w2", lease_seconds=30)
    assert new.lease_owner == "w2" and new.attempts == 2
    with pytest.raises(LeaseLost):
        queue.heartbeat(old, 30)
    commits = []
    with pytest.raises(LeaseLost):
        queue.finish(old, lambda: commits.append("old"))
    queue.finish(new, lambda: commits.append("new"))
    assert commits == ["new"] and queue.get("session-a").state == "done"


def test_retry_with_backoff_then_failed(queue, clock):
    queue.enqueue("session-a")
    for attempt in (1, 2):
        job = queue.claim("w1", lease_seconds=30)
        assert job.attempts == attempt
        assert queue.fail(job, "boom", retry=True) == "queued"
        assert queue.claim("w1", lease_seconds=30) is None  # backing off
        assert queue.pending() == pytest.approx(clock.now + 10.0 * 2 ** (attempt - 1))
        clock.now += 10.0 * 2 ** (attempt - 1)
    job = queue.claim("w1", lease_seconds=30)
    assert queue.fail(job, "boom again", retry=True) == "failed"
    failed = queue.get("session-a")
    assert failed.state == "failed" and failed.error == "boom again" and queue.pending() is None


def test_lease_expiry_with_no_attempts_left_fails(queue, clock):
    queue.enqueue("session-a")
    for _ in range(3):
        assert queue.claim("w", lease_seconds=5) is not None
        clock.now += 6
    assert queue.claim("w", lease_seconds=5) is None
    job = queue.get("session-a")
    assert job.state == "failed" and "lease expired" in job.error


def test_permanent_failure_and_enqueue_failed(queue):
    queue.enqueue("session-a")
    job = queue.claim("w", lease_seconds=5)
    assert queue.fail(job, "disk full", retry=False) == "failed"
    queue.enqueue("session-b", error="recording broken")
    assert queue.get("session-b").state == "failed" and queue.get("session-b").error == "recording broken"


def test_claim_one_session_and_delete(queue):
    queue.enqueue("session-a")
    queue.enqueue("session-b")
    assert queue.claim("w", 5, session_id="session-b").session_id == "session-b"
    queue.delete("session-a")
    assert queue.get("session-a") is None and queue.pending("session-a") is None


def test_failed_commit_leaves_the_job_refining(queue):
    queue.enqueue("session-a")
    job = queue.claim("w", 5)

    def commit():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        queue.finish(job, commit)
    assert queue.get("session-a").state == "refining"
