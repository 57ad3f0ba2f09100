"""The refinement worker on synthetic recordings of the tiny model's geometry, with a stand-in refiner:
frame counts, resume after a failure, disk full, and the crash test (SIGKILL mid-job, restart, done once)."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_server.jobs import JobQueue
from stream_server.recording import RecordingStore
from stream_server.refining import RefineWorker

from .helpers import CHUNK_FRAMES, count_frames, identity_refine, write_recording

ROOT = Path(__file__).resolve().parents[2]
SESSION = "session-0123456789"


@pytest.fixture(scope="module")
def vae():
    from world_model.vae import VideoVAE

    return VideoVAE.from_preset("tiny", seed=0)


def make_worker(data_dir: Path, vae, refine=identity_refine, **kw) -> RefineWorker:
    return RefineWorker(RecordingStore(data_dir), JobQueue(data_dir, backoff_seconds=0.0), refine, vae, model="tiny", **kw)


def test_refined_video_matches_the_preview(tmp_path, vae):
    write_recording(tmp_path, SESSION, "tok", chunks=3)
    assert make_worker(tmp_path, vae).run() == 1
    folder = tmp_path / "sessions" / SESSION
    assert count_frames(folder / "preview.mp4") == count_frames(folder / "refined.mp4") == 3 * CHUNK_FRAMES
    assert JobQueue(tmp_path).get(SESSION).state == "done"
    assert not (folder / "refine").exists() and not list(folder.glob("*.tmp"))


def test_resumes_from_saved_blocks_after_a_failure(tmp_path, vae):
    write_recording(tmp_path, SESSION, "tok", chunks=3)  # 10 latent frames: blocks 0-3, 4-6, 7-9
    calls = []

    def flaky(latents, prompt, **kw):
        calls.append(kw["start_frame"])
        for i, block in enumerate(identity_refine(latents, prompt, **kw)):
            if len(calls) == 1 and i == 2:
                raise RuntimeError("refiner crashed")
            yield block

    assert make_worker(tmp_path, vae, flaky).run() == 1
    assert calls == [0, 7]  # the second attempt refined only the last block
    job = JobQueue(tmp_path).get(SESSION)
    assert job.state == "done" and job.attempts == 2
    assert count_frames(tmp_path / "sessions" / SESSION / "refined.mp4") == 3 * CHUNK_FRAMES


def test_disk_full_fails_clearly_and_keeps_the_preview(tmp_path, vae):
    write_recording(tmp_path, SESSION, "tok")

    def full(latents, prompt, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield

    make_worker(tmp_path, vae, full).run()
    job = JobQueue(tmp_path).get(SESSION)
    assert job.state == "failed" and job.attempts == 1 and "disk full" in job.error
    assert (tmp_path / "sessions" / SESSION / "preview.mp4").is_file()
    assert not (tmp_path / "sessions" / SESSION / "refined.mp4").exists()


def test_other_model_fails_without_retry(tmp_path, vae):
    write_recording(tmp_path, SESSION, "tok")
    worker = RefineWorker(RecordingStore(tmp_path), JobQueue(tmp_path), identity_refine, vae, model="sana-wm-streaming")
    worker.run()
    job = JobQueue(tmp_path).get(SESSION)
    assert job.state == "failed" and "recorded with model tiny" in job.error


def _start(data_dir: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.replays.slow_worker", str(data_dir), "--delay", str(delay)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_job_then_restart_completes_exactly_once(tmp_path):
    write_recording(tmp_path, SESSION, "tok", chunks=4)  # 13 latent frames: 4 blocks
    queue = JobQueue(tmp_path)
    first = _start(tmp_path, delay=1.0)
    deadline = time.monotonic() + 60
    while not (queue.get(SESSION).state == "refining" and queue.get(SESSION).progress > 0):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() is not None else "no progress"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = queue.get(SESSION)
    assert killed_at.state == "refining" and 0 < killed_at.progress < 1

    second = _start(tmp_path, delay=0.0)  # waits out the dead worker's lease, then resumes
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    assert "finished 1" in out
    rows = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("SELECT state, attempts FROM jobs").fetchall()
    assert rows == [("done", 2)]
    folder = tmp_path / "sessions" / SESSION
    assert count_frames(folder / "refined.mp4") == count_frames(folder / "preview.mp4") == 4 * CHUNK_FRAMES
    assert not list(folder.glob("*.tmp")) and not (folder / "refine").exists()
