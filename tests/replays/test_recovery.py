"""Recordings left open by a killed server: a recorder process is SIGKILLed mid-session, then recovery (as the
server runs it at start) keeps the chunks every file holds whole, leaves a playable preview of whole fragments,
marks the recording ended and queues it once; a second recovery changes nothing, and the worker refines it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from stream_server.app import create_app
from stream_server.jobs import JobQueue
from stream_server.recording import POSE_BYTES, RecordingStore, SessionRecording, prompt_schedule, recover_recordings
from stream_server.refining import RefineWorker

from ..server.conftest import FAST
from ..server.fake_engine import FakeEngine
from .helpers import CHANNELS, CHUNK_FRAMES, LATENT_H, LATENT_W, count_frames, identity_refine, recording_meta, write_recording

ROOT = Path(__file__).resolve().parents[2]
SESSION = "crashed-0123456789"
LATENT_BYTES = CHANNELS * LATENT_H * LATENT_W * 2  # one float16 latent frame


def record_then_kill(data_dir: Path, chunks: int, *, frames: int = CHUNK_FRAMES, latents: int = 3,
                     prompts: dict[int, str] | None = None, model: str = "tiny") -> Path:
    """Record ``chunks`` chunks in a child process and SIGKILL it once they are written; the session's folder."""
    command = [sys.executable, "-m", "tests.replays.crash_recorder", str(data_dir), SESSION, "--chunks", str(chunks),
               "--frames", str(frames), "--latents", str(latents), "--prompts", json.dumps(prompts or {0: "a harbour"}),
               "--model", model]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "recorded", line + child.stdout.read()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    return data_dir / "sessions" / SESSION


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_consistent(folder: Path, meta: dict, *, frames: int, latents: int) -> None:
    """Every file holds exactly ``meta["chunks"]`` chunks of ``frames`` video frames (latents: 1 + n per chunk)."""
    chunks = meta["chunks"]
    assert meta["frames"] == chunks * frames
    assert count_frames(folder / "preview.mp4") == chunks * frames
    assert len((folder / "chunks.jsonl").read_text().splitlines()) == chunks
    assert (folder / "poses.f64").stat().st_size == chunks * frames * POSE_BYTES
    assert meta["latents"]["frames"] == 1 + latents * chunks
    assert (folder / "latents.f16").stat().st_size == (1 + latents * chunks) * LATENT_BYTES
    assert not (folder / "preview.mp4.part").exists()


def test_killed_recording_is_recovered_queued_once_and_refined(tmp_path):
    folder = record_then_kill(tmp_path, chunks=4)
    assert (folder / "preview.mp4.part").is_file() and not (folder / "preview.mp4").exists()
    store, jobs = RecordingStore(tmp_path), JobQueue(tmp_path, backoff_seconds=0.0)
    assert store.read_meta(SESSION)["ended_at"] is None and jobs.jobs() == []  # as the crash left it

    assert recover_recordings(store, jobs) == [SESSION]
    meta = store.read_meta(SESSION)
    assert meta["end_reason"] == "recovered" and meta["ended_at"] is not None and meta["recording_error"] is None
    assert meta["preview"] == "preview.mp4" and meta["prompts"] == [{"chunk": 0, "latent_frame": 0, "prompt": "a harbour"}]
    # The encoder and the muxer held the newest frames when the process died: the preview has the older whole
    # chunks (one fragment each), and every other file was cut to as many.
    assert 2 <= meta["chunks"] < 4
    assert_consistent(folder, meta, frames=CHUNK_FRAMES, latents=3)
    assert [(j.session_id, j.state) for j in jobs.jobs()] == [(SESSION, "queued")]

    before = snapshot(folder)
    assert recover_recordings(store, jobs) == []  # a second recovery changes nothing
    assert snapshot(folder) == before
    assert [(j.session_id, j.state, j.attempts) for j in jobs.jobs()] == [(SESSION, "queued", 0)]

    from world_model.vae import VideoVAE

    worker = RefineWorker(store, jobs, identity_refine, VideoVAE.from_preset("tiny", seed=0), model="tiny")
    assert worker.run() == 1
    assert count_frames(folder / "refined.mp4") == meta["frames"]


def test_torn_files_are_cut_to_the_chunks_all_of_them_hold(tmp_path):
    folder = record_then_kill(tmp_path, chunks=4)
    with open(folder / "chunks.jsonl", "ab") as f:
        f.write(b'{"chunk": 4, "fra')  # a line the writer did not finish
    with open(folder / "latents.f16", "rb+") as f:
        f.truncate(int(8.5 * LATENT_BYTES))  # chunk 0: frames 0-3, chunk 1: 4-6, chunk 2 (7-9) torn
    with open(folder / "preview.mp4.part", "ab") as f:
        f.write(b"\x00\x00\x10\x00moof\x00\x00")  # a fragment the muxer did not finish

    assert recover_recordings(RecordingStore(tmp_path), JobQueue(tmp_path)) == [SESSION]
    meta = RecordingStore(tmp_path).read_meta(SESSION)
    assert meta["chunks"] == 2
    assert_consistent(folder, meta, frames=CHUNK_FRAMES, latents=3)


def test_short_chunks_are_cut_at_a_fragment_boundary(tmp_path):
    """8-frame chunks (--chunk-frames 1) get a keyframe, so a fragment, every second chunk."""
    folder = record_then_kill(tmp_path, chunks=7, frames=8, latents=1)
    assert recover_recordings(RecordingStore(tmp_path), JobQueue(tmp_path)) == [SESSION]
    meta = RecordingStore(tmp_path).read_meta(SESSION)
    assert meta["chunks"] in (2, 4, 6)
    assert_consistent(folder, meta, frames=8, latents=1)


def test_prompt_changes_of_a_recovered_recording_keep_their_latent_frames(tmp_path):
    record_then_kill(tmp_path, chunks=5, prompts={0: "a harbour", 1: "a desert", 4: "a forest"})
    recover_recordings(RecordingStore(tmp_path), JobQueue(tmp_path))
    meta = RecordingStore(tmp_path).read_meta(SESSION)
    assert meta["chunks"] >= 2  # the change at chunk 4 was cut with its chunk
    assert prompt_schedule(meta) == [(0, "a harbour"), (4, "a desert")]


def test_killed_before_any_chunk_fails_its_job(tmp_path):
    store = RecordingStore(tmp_path)
    recording = SessionRecording(store.folder(SESSION), recording_meta(SESSION, "tok"), None)
    recording._queue.put(None)  # stop the writer thread as a crash would: nothing written, nothing closed
    recording._thread.join()
    jobs = JobQueue(tmp_path)
    assert recover_recordings(store, jobs) == [SESSION]
    meta = store.read_meta(SESSION)
    assert meta["chunks"] == 0 and meta["preview"] is None and "before a whole chunk" in meta["recording_error"]
    job = jobs.get(SESSION)
    assert job.state == "failed" and "before a whole chunk" in job.error


def test_a_closed_recording_without_a_job_is_queued_untouched(tmp_path):
    """Closed at shutdown (no end hook ran) or killed between closing and queueing."""
    write_recording(tmp_path, SESSION, "tok", enqueue=False)
    folder = tmp_path / "sessions" / SESSION
    before = snapshot(folder)
    jobs = JobQueue(tmp_path)
    assert recover_recordings(RecordingStore(tmp_path), jobs) == []
    assert snapshot(folder) == before and jobs.get(SESSION).state == "queued"


@pytest.mark.asyncio
async def test_server_start_recovers_and_serves_the_replay(tmp_path):
    folder = record_then_kill(tmp_path, chunks=3)
    app = create_app(FakeEngine(), dataclasses.replace(FAST, data_dir=tmp_path))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        status = await (await client.get(f"/v1/replays/{SESSION}?token=tok")).json()
        assert status["state"] == "queued" and set(status["files"]) == {"preview"}, status
        video = await client.get(f"/v1/replays/{SESSION}/preview.mp4", headers={"Authorization": "Bearer tok"})
        assert video.status == 200 and count_frames(await video.read()) == status["frames"] > 0
    assert (folder / "preview.mp4").is_file()
