"""Preview-only replays: a server with no refiner for its model (the default trained ``demo`` model) queues no
refinement job; a session's replay is final when it ends (``"state": "done"``, ``"refined": false`` and the
reason), ``preview.mp4`` downloads and ``refined.mp4`` is a JSON 404 that says why. The same after a crash
(recovery), for jobs an earlier version queued, and for ``sana-wm-stream refine`` run by hand. With a
refiner (``tiny``) nothing changes: sessions are queued."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from stream_server.app import APP_KEY, create_app
from stream_server.cli import build_parser, main, serve_no_refiner
from stream_server.jobs import JobQueue
from stream_server.recording import RecordingStore, recover_recordings
from stream_server.sdk import StreamClient

from ..server.conftest import FAST
from ..server.fake_engine import FakeEngine
from .helpers import count_frames, write_recording
from .test_recovery import SESSION, record_then_kill

NO_REFINER = "no refiner for model fake"  # what serve_no_refiner says for the demo model, for the fake engine's
PREVIEW_ONLY = dataclasses.replace(FAST, no_refiner=NO_REFINER)


async def until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def check_preview_only(client: TestClient, session_id: str, token: str, reason: str) -> None:
    """The replay is final and preview-only: status, preview download, refined 404."""
    auth = {"Authorization": f"Bearer {token}"}
    status = await (await client.get(f"/v1/replays/{session_id}", headers=auth)).json()
    assert status["state"] == "done" and status["progress"] == 1.0, status
    assert status["refined"] is False and status["reason"] == reason and set(status["files"]) == {"preview"}
    preview = await client.get(status["files"]["preview"]["url"], headers={**auth, "Range": "bytes=0-"})
    assert preview.status == 206 and count_frames(await preview.read()) == status["frames"] > 0
    refined = await client.get(f"/v1/replays/{session_id}/refined.mp4?token={token}")
    error = (await refined.json())["error"]
    assert refined.status == 404 and refined.content_type == "application/json"
    assert error["code"] == "not_refined" and reason in error["message"] and "preview.mp4" in error["message"]


@pytest.mark.asyncio
async def test_an_ended_session_gets_no_job_and_a_final_preview_only_replay(tmp_path):
    app = create_app(FakeEngine(), dataclasses.replace(PREVIEW_ONLY, data_dir=tmp_path))
    async with TestServer(app, host="127.0.0.1") as server, StreamClient(str(server.make_url("")).rstrip("/")) as sdk:
        session = await sdk.create_session("a harbour at dusk")
        await session.connect()
        folder = tmp_path / "sessions" / session.id
        await until(lambda: (folder / "chunks.jsonl").exists() and len((folder / "chunks.jsonl").read_text().splitlines()) >= 2,
                    60, "two recorded chunks")
        await session.end()  # DELETE: the recording is closed (and, with a refiner, queued) before the answer

        assert app[APP_KEY].jobs.jobs() == []
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["preview_only"] == NO_REFINER and meta["end_reason"] == "deleted" and meta["recording_error"] is None
        async with TestClient(server) as client:
            await check_preview_only(client, session.id, session.token, NO_REFINER)


@pytest.mark.asyncio
async def test_a_crashed_recording_is_recovered_preview_only(tmp_path):
    folder = record_then_kill(tmp_path, chunks=3, model="fake")
    app = create_app(FakeEngine(), dataclasses.replace(PREVIEW_ONLY, data_dir=tmp_path))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert app[APP_KEY].jobs.jobs() == []
        await check_preview_only(client, SESSION, "tok", NO_REFINER)
    meta = RecordingStore(tmp_path).read_meta(SESSION)
    assert meta["end_reason"] == "recovered" and meta["preview_only"] == NO_REFINER
    assert (folder / "preview.mp4").is_file()


def test_recovery_marks_preview_only_once_and_drops_unstarted_jobs_only(tmp_path):
    unrefined = {"demo": "no refiner for model demo"}
    write_recording(tmp_path, "unqueued-0123456789", "tok", model="demo", enqueue=False)  # closed, no job yet
    write_recording(tmp_path, "stale-0123456789", "tok", model="demo")  # queued by an earlier version
    write_recording(tmp_path, "started-0123456789", "tok", model="demo")
    write_recording(tmp_path, "tiny-0123456789", "tok", enqueue=False)  # a model the server can refine
    store, jobs = RecordingStore(tmp_path), JobQueue(tmp_path)
    jobs.claim("another-worker", 30, "started-0123456789")  # a worker took it: left to the queue

    assert recover_recordings(store, jobs, unrefined=unrefined) == []
    assert {j.session_id: j.state for j in jobs.jobs()} == {"started-0123456789": "refining", "tiny-0123456789": "queued"}
    marks = {sid: store.read_meta(sid).get("preview_only") for sid in store.session_ids()}
    assert marks == {"unqueued-0123456789": "no refiner for model demo", "stale-0123456789": "no refiner for model demo",
                     "started-0123456789": None, "tiny-0123456789": None}

    before = {sid: (store.folder(sid) / "meta.json").read_bytes() for sid in store.session_ids()}
    assert recover_recordings(store, jobs, unrefined=unrefined) == []  # idempotent
    assert {sid: (store.folder(sid) / "meta.json").read_bytes() for sid in store.session_ids()} == before
    assert len(jobs.jobs()) == 2


def test_a_broken_recording_still_fails_its_job(tmp_path):
    """A recording with an error has no preview to offer: its job is failed at once, as with a refiner."""
    write_recording(tmp_path, SESSION, "tok", model="demo", enqueue=False)
    store = RecordingStore(tmp_path)
    meta = store.read_meta(SESSION)
    (store.folder(SESSION) / "meta.json").write_text(json.dumps({**meta, "recording_error": "disk full", "preview": None}))
    jobs = JobQueue(tmp_path)
    recover_recordings(store, jobs, unrefined={"demo": "no refiner for model demo"})
    assert jobs.get(SESSION).state == "failed" and "preview_only" not in store.read_meta(SESSION)


def test_refine_by_hand_leaves_preview_only_replays_alone(tmp_path, capsys):
    write_recording(tmp_path, SESSION, "tok", enqueue=False)  # tiny geometry, so the tiny refiner could take it
    recover_recordings(RecordingStore(tmp_path), JobQueue(tmp_path), unrefined={"tiny": "no refiner for model tiny"})
    assert main(["refine", "--data-dir", str(tmp_path), "--model", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == "refined 0 session(s)"
    assert main(["refine", "--data-dir", str(tmp_path), "--model", "tiny", SESSION]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "preview-only" in err and "no refiner for model tiny" in err
    assert JobQueue(tmp_path).jobs() == [] and not (tmp_path / "sessions" / SESSION / "refined.mp4").exists()


@pytest.mark.parametrize("argv, reason", [
    (["serve"], "no refiner for model demo"),
    (["serve", "--model", "demo", "--random-weights"], "no refiner for model demo"),
    (["serve", "--model", "sana-wm-streaming"], None),  # random weights: the release-size refiner, random too
    (["serve", "--model", "tiny", "--checkpoint", "/nowhere"], "--checkpoint"),
    (["serve", "--model", "tiny"], None),
])
def test_serve_decides_preview_only_from_whether_a_refiner_can_be_built(argv, reason):
    found = serve_no_refiner(build_parser().parse_args(argv))
    assert found is None if reason is None else reason in found


@pytest.mark.asyncio
async def test_with_a_refiner_sessions_are_still_queued(tmp_path):
    """``no_refiner`` unset (serve --model tiny): a recovered recording is queued, and its status says so."""
    record_then_kill(tmp_path, chunks=2, model="fake")
    app = create_app(FakeEngine(), dataclasses.replace(FAST, data_dir=tmp_path))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        status = await (await client.get(f"/v1/replays/{SESSION}?token=tok")).json()
        assert status["state"] == "queued" and "refined" not in status and "reason" not in status
        refined = await client.get(f"/v1/replays/{SESSION}/refined.mp4?token=tok")
        assert refined.status == 404 and (await refined.json())["error"]["code"] == "not_ready"
    assert [j.state for j in app[APP_KEY].jobs.jobs()] == ["queued"]
