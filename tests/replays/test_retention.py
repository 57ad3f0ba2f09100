"""Retention: the TTL and the size limit delete the oldest replays first (files and job), never live ones."""

from __future__ import annotations

import time

from stream_server.jobs import JobQueue
from stream_server.recording import RecordingStore
from stream_server.replays import Retention, _folder_bytes, apply_retention

from .helpers import write_recording

IDS = ["oldest-0123456789", "middle-0123456789", "newest-0123456789"]


def _three(tmp_path, now):
    for age, sid in zip((300, 200, 100), IDS):
        write_recording(tmp_path, sid, "tok", chunks=1, ended_at=now - age)
    return RecordingStore(tmp_path), JobQueue(tmp_path)


def test_ttl_deletes_replays_ended_long_ago(tmp_path):
    now = time.time()
    store, queue = _three(tmp_path, now)
    assert apply_retention(store, queue, Retention(ttl_seconds=250), now=now) == [IDS[0]]
    assert sorted(store.session_ids()) == sorted(IDS[1:])
    assert queue.get(IDS[0]) is None and queue.get(IDS[1]) is not None


def test_size_limit_deletes_oldest_first(tmp_path):
    now = time.time()
    store, queue = _three(tmp_path, now)
    size = _folder_bytes(store.folder(IDS[2]))
    deleted = apply_retention(store, queue, Retention(max_bytes=int(2.5 * size)), now=now)
    assert deleted == [IDS[0]] and sorted(store.session_ids()) == sorted(IDS[1:])
    assert apply_retention(store, queue, Retention(max_bytes=1), keep=frozenset({IDS[1]}), now=now) == [IDS[2]]
    assert store.session_ids() == [IDS[1]]  # a live session is never deleted


def test_no_policy_deletes_nothing(tmp_path):
    now = time.time()
    store, queue = _three(tmp_path, now)
    assert apply_retention(store, queue, Retention(), now=now) == []
    assert len(store.session_ids()) == 3
