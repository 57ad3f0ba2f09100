"""The refinement worker on synthetic recordings of the tiny model's geometry, with a stand-in refiner:
frame counts, resume after a failure, disk full (from the refiner, from the video writer, at close), a video
that reads back short, the prompt schedule, and the crash test (SIGKILL mid-job, restart, done once)."""

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

from stream_server import refining
from stream_server.jobs import JobQueue
from stream_server.recording import RecordingStore, prompt_schedule
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


def _disk_full_at_write(monkeypatch):
    """The refined video goes to /dev/full: ffmpeg itself meets ENOSPC when it writes."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    init = refining._VideoWriter.__init__
    monkeypatch.setattr(refining._VideoWriter, "__init__", lambda self, path, *args: init(self, Path("/dev/full"), *args))


def _disk_full_at_close(monkeypatch):
    """The file is written, then its close (the trailer, fsync) fails with ENOSPC."""
    close = refining._VideoWriter.close

    def failing_close(self):
        close(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(refining._VideoWriter, "close", failing_close)


@pytest.mark.parametrize("fill", [_disk_full_at_write, _disk_full_at_close])
def test_disk_full_while_writing_the_video_fails_and_leaves_no_partial_file(tmp_path, vae, monkeypatch, fill):
    write_recording(tmp_path, SESSION, "tok")
    folder = tmp_path / "sessions" / SESSION
    preview = (folder / "preview.mp4").read_bytes()
    fill(monkeypatch)
    assert make_worker(tmp_path, vae).run() == 0
    job = JobQueue(tmp_path).get(SESSION)
    assert job.state == "failed" and job.attempts == 1 and job.error.startswith("disk full while refining")
    assert not (folder / "refined.mp4").exists() and not list(folder.glob("*.tmp"))
    assert (folder / "preview.mp4").read_bytes() == preview


def test_a_video_that_reads_back_short_is_never_marked_done(tmp_path, vae, monkeypatch):
    """A write failure nobody reported (close returned): the read-back check catches the cut file."""
    write_recording(tmp_path, SESSION, "tok")
    close = refining._VideoWriter.close

    def close_then_lose_the_tail(self):
        close(self)
        with open(self.path, "rb+") as f:
            f.truncate(f.seek(0, os.SEEK_END) // 2)

    monkeypatch.setattr(refining._VideoWriter, "close", close_then_lose_the_tail)
    assert make_worker(tmp_path, vae).run() == 0
    job = JobQueue(tmp_path).get(SESSION)
    assert job.state == "failed" and job.attempts == 3  # retried: it may have been a passing fault
    assert not (tmp_path / "sessions" / SESSION / "refined.mp4").exists()


def test_refiner_gets_the_prompt_in_effect_from_each_change(tmp_path, vae):
    """Prompt changes at chunks 2 and 3: chunk 0 holds latent frames 0-3, later chunks 3 each."""
    write_recording(tmp_path, SESSION, "tok", chunks=4, prompts={0: "a harbour", 2: "a desert", 3: "a forest"})
    seen = []

    def recording_refine(latents, prompt, **kw):
        seen.append(list(prompt))
        return identity_refine(latents, prompt, **kw)

    assert make_worker(tmp_path, vae, recording_refine).run() == 1
    assert seen == [[(0, "a harbour"), (7, "a desert"), (10, "a forest")]]


def test_prompt_schedule_of_short_chunks_and_of_older_recordings(tmp_path):
    store = write_recording(tmp_path, SESSION, "tok", chunks=4, frames=8, latents=1, prompts={0: "a", 3: "b"})
    meta = store.read_meta(SESSION)
    assert prompt_schedule(meta) == [(0, "a"), (4, "b")]  # chunk 0: latent frames 0-1, then one each
    for change in meta["prompts"]:  # written before latent_frame was: inferred from the latent and chunk counts
        del change["latent_frame"]
    assert prompt_schedule(meta) == [(0, "a"), (4, "b")]


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
